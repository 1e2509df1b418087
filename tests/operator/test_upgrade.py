"""Operator upgrades roll nothing: the pod template depends only on what the user set (docs/operator.md,
"Upgrading the operator").

- the worker reads back exactly the spec the operator rendered (CONVEYOR_SPEC without defaults);
- a release that adds a field with a default (simulated by subclassing the models) renders the same
  pods, and its pods' spec still parses with the older worker's models (image skew);
- a value set equal to its default renders like an omitted one, which is what keeps templates stable
  under the API server's schema defaulting (it writes every default into the stored object).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from conveyor import crd
from conveyor.env import PodEnv
from conveyor.spec import (
    InferenceSpec,
    PipelineJobSpec,
    SamplingSpec,
    parse_spec,
    spec_to_json,
)
from conveyor.spec_model import SpecModel
from conveyor.train_spec import TrainSpec
from conveyor_operator import reconcile, render
from pydantic import Field

from tests.operator.builders import group_pods, inference_spec, job_body, serve_spec, train_spec
from tests.operator.test_reconcile import reasons, step
from tests.operator.test_render import JOB, _environ

FULL_TEMPLATE = {
    "nodeSelector": {"gpu": "h200"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {}},
    "env": [{"name": "NCCL_DEBUG", "value": "WARN"}],
    "labels": {"team": "ml"},
    "annotations": {"owner": "ml"},
}

SPECS: dict[str, dict[str, Any]] = {
    "inference-minimal": {
        "mode": "inference",
        "model": {"path": "/m"},
        "inference": {"input": "/in.jsonl", "output": "/out.jsonl"},
    },
    "inference-every-block": inference_spec(
        stages=4,
        tp=2,
        replicas=3,
        model={"path": "/m", "dtype": "float16", "volume": "models", "mountPath": "/w"},
        parallelism={"stages": 4, "tensorParallel": 2, "replicas": 3, "microBatches": 8},
        inference={
            "input": "/in.jsonl",
            "output": "/out.jsonl",
            "maxNewTokens": 7,
            "quantization": "int8",
            "sampling": {"temperature": 0.7, "topK": 5, "stopTokenIds": [2], "stop": ["\n"]},
        },
        resources={"gpus": 4, "requests": {"memory": "64Gi"}},
        template=FULL_TEMPLATE,
        checkpoint={"volume": "ckpt", "every": 5, "keep": 1},
        image="registry.local/conveyor:2",
        device="cuda",
    ),
    "inference-explicit-empty-blocks": inference_spec(
        inference={"input": "/in", "output": "/out", "sampling": {}}, checkpoint={}, template={}
    ),
    "train-minimal": {
        "mode": "train",
        "checkpoint": {"volume": "ckpt"},
        "train": {"script": "/app/train.py"},
    },
    "train-every-block": train_spec(
        stages=2, tp=2, replicas=2, train={"script": "/t.py", "args": ["-x"], "steps": 3, "config": {"a": 1}}
    ),
    "finetune-minimal": {
        "mode": "train",
        "model": {"path": "/m"},
        "checkpoint": {"volume": "ckpt"},
        "train": {"dataset": "/d.jsonl", "steps": 5, "optimizer": {}, "scheduler": {}},
    },
    "serve-minimal": {"mode": "serve", "model": {"path": "/m"}, "serve": {}},
    "serve-every-block": serve_spec(
        replicas=3, serve={"port": 9000, "maxBatchSize": 16}, template=FULL_TEMPLATE
    ),
}


def pod_spec_of(sts: dict[str, Any]) -> PipelineJobSpec:
    """The spec a worker of this StatefulSet parses from its environment."""
    return PodEnv.from_environ(_environ(sts, 0)).spec


@pytest.mark.parametrize("name", sorted(SPECS))
def test_worker_parses_back_the_rendered_spec(name: str) -> None:
    spec = parse_spec(SPECS[name])
    assert parse_spec(json.loads(spec_to_json(spec))) == spec
    for sts in render.build_statefulsets(JOB, spec, {}, running=True):
        assert pod_spec_of(sts) == render.worker_spec(spec)


def test_rendered_spec_carries_only_what_differs_from_defaults() -> None:
    wire = json.loads(spec_to_json(render.worker_spec(parse_spec(SPECS["inference-explicit-empty-blocks"]))))
    assert wire["inference"] == {"input": "/in", "output": "/out"}  # an empty sampling block is all defaults
    assert wire["checkpoint"] == {}  # set, though all defaults: present (its default is None)
    assert "template" not in wire and "restartPolicy" not in wire and "parallelism" in wire


# ---- a later release adds fields with defaults: an optional block and a field in a nested model ----


class _FutureSampling(SamplingSpec):
    min_p: float = Field(0.0, ge=0.0, le=1.0)


class _FutureInference(InferenceSpec):
    sampling: _FutureSampling = Field(default_factory=_FutureSampling)
    speculative_tokens: int = Field(0, ge=0)


class _FutureTrain(TrainSpec):
    gradient_checkpointing: bool = False


class _Preemption(SpecModel):
    policy: str = "never"


class _FutureSpec(PipelineJobSpec):
    inference: _FutureInference | None = None
    train: _FutureTrain | None = None
    preemption: _Preemption = Field(default_factory=_Preemption)
    drain_seconds: int = 30


def _pods_template(spec: PipelineJobSpec, restarts: dict[str, int] | None = None) -> list[Any]:
    return render.build_all(JOB, spec, restarts or {}, running=True)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_new_field_with_a_default_changes_no_rendered_object(name: str) -> None:
    today, next_release = parse_spec(SPECS[name]), _FutureSpec.model_validate(SPECS[name])
    assert _pods_template(next_release, {"llm": 2}) == _pods_template(today, {"llm": 2})
    assert render.template_hash(next_release) == render.template_hash(today)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_an_older_worker_image_parses_what_a_newer_operator_renders(name: str) -> None:
    next_release = _FutureSpec.model_validate(SPECS[name])
    for sts in render.build_statefulsets(JOB, next_release, {}, running=True):
        # Today's models refuse unknown fields: a rendered default would crash an older worker.
        assert pod_spec_of(sts) == render.worker_spec(parse_spec(SPECS[name]))


def test_a_new_field_set_by_the_user_does_change_the_template() -> None:
    doc = copy.deepcopy(SPECS["inference-minimal"])
    doc["inference"]["speculativeTokens"] = 4
    base = _FutureSpec.model_validate(SPECS["inference-minimal"])
    assert render.template_hash(_FutureSpec.model_validate(doc)) != render.template_hash(base)


# ---- set-equal-to-default == omitted: the API server's schema defaulting must not change the pods ----


def _apply_schema_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Structural-schema defaulting as the API server does it on create and on every read from etcd:
    a missing property with a ``default`` gets it, recursively (also inside defaults it just set)."""
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = _apply_schema_defaults(value[key], sub)
    elif isinstance(value, list) and "items" in schema:
        return [_apply_schema_defaults(v, schema["items"]) for v in value]
    return value


SPEC_SCHEMA = crd.pipelinejob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_schema_defaulted_spec_renders_like_the_spec_as_written(name: str) -> None:
    stored = _apply_schema_defaults(copy.deepcopy(SPECS[name]), SPEC_SCHEMA)
    assert stored != SPECS[name]  # the stored object carries defaults the user never wrote
    if "inference" in stored:
        assert stored["inference"]["batchSize"] == 8 and stored["inference"]["sampling"]["topP"] == 1.0
    written, defaulted = parse_spec(SPECS[name]), parse_spec(stored)
    assert _pods_template(defaulted) == _pods_template(written)


def test_a_value_set_equal_to_its_default_renders_like_an_omitted_one() -> None:
    omitted = parse_spec(SPECS["inference-minimal"])
    doc = copy.deepcopy(SPECS["inference-minimal"])
    doc["inference"].update(quantization="none", batchSize=8, sampling={"temperature": 0.0})
    doc.update(parallelism={"stages": 1, "partitionMethod": "parameters"}, metricsPort=9400)
    assert _pods_template(parse_spec(doc)) == _pods_template(omitted)
    # Not equal to the default: it shows.
    doc["inference"]["quantization"] = "int8"
    assert render.template_hash(parse_spec(doc)) != render.template_hash(omitted)


def test_the_default_image_is_not_in_the_worker_spec_but_the_container_image_is_hashed() -> None:
    a = parse_spec(inference_spec(image="registry.local/conveyor:1"))
    b = parse_spec(inference_spec(image="registry.local/conveyor:2"))
    (sts_a,), (sts_b,) = (
        render.build_statefulsets(JOB, a, {}, running=True),
        render.build_statefulsets(JOB, b, {}, running=True),
    )
    env_a, env_b = _environ(sts_a, 0), _environ(sts_b, 0)
    assert "image" not in json.loads(env_a["CONVEYOR_SPEC"])
    assert env_a["CONVEYOR_SPEC"] == env_b["CONVEYOR_SPEC"]
    assert render.template_hash(a) != render.template_hash(b)
    # Ranks of the two images never meet in one rendezvous.
    assert env_a.pop("CONVEYOR_TEMPLATE_HASH") == render.template_hash(a)
    assert env_b.pop("CONVEYOR_TEMPLATE_HASH") == render.template_hash(b)
    assert env_a == env_b


def test_an_operator_upgrade_that_adds_a_field_rolls_no_running_job(monkeypatch: pytest.MonkeyPatch) -> None:
    body = job_body(inference_spec(replicas=2))
    step(body, [], 0)
    pods = group_pods(body, 0) + group_pods(body, 1)  # rendered by today's operator
    assert step(body, pods, 5).delete_pods == []
    # The next release's operator reconciles the same job; the API server has defaulted the new fields.
    monkeypatch.setattr(reconcile, "parse_spec", _FutureSpec.model_validate)
    body["spec"]["inference"]["speculativeTokens"] = 0
    for t in (10, 20):
        plan = step(body, pods, t)
        assert plan.delete_pods == [] and "GroupRolled" not in reasons(plan)
    assert body["status"]["phase"] == "Running"


def test_a_template_revision_bump_is_the_deliberate_way_to_roll_on_upgrade(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = parse_spec(SPECS["serve-every-block"])
    before = render.template_hash(spec)
    monkeypatch.setattr(render, "TEMPLATE_REVISION", render.TEMPLATE_REVISION + 1)
    assert render.template_hash(spec) != before
