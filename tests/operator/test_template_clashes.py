"""The operator's backstop for spec.template items that reuse a key of its actual rendering (the spec model
refuses them first, from its table in conveyor.template_keys: test_template_admission.py): each is
reported as InvalidSpec naming the item and the fix, instead of every server-side apply of the job's
StatefulSets failing. The specs here skip the model's check, as a rendering that outgrew the table would."""

from __future__ import annotations

from typing import Any

import pytest
from conveyor import template_keys
from conveyor.spec import PipelineJobSpec, TemplateSpec, parse_spec
from conveyor_operator import k8s
from conveyor_operator.plan import JobView
from conveyor_operator.reconcile import plan_reconcile
from conveyor_operator.template_clashes import template_clashes

from tests.operator.builders import at, inference_spec, job_body, serve_spec, train_spec


def unchecked(spec: dict[str, Any]) -> PipelineJobSpec:
    """``spec`` with its template set past the model's own template check."""
    template = TemplateSpec.model_validate(spec.pop("template", {}))
    return parse_spec(spec).model_copy(update={"template": template})


def clashes(**template: Any) -> list[str]:
    return template_clashes(unchecked(inference_spec(template=template)))


def test_an_env_var_the_operator_sets_is_named_with_the_fix() -> None:
    found = clashes(env=[{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "CONVEYOR_JOB", "value": "x"}])
    assert found == [
        "spec.template.env[1].name: 'CONVEYOR_JOB' is set by the operator: remove it "
        '(docs/design.md, "Worker environment")'
    ]


def test_the_operator_env_of_each_mode_counts() -> None:
    train = train_spec(template={"env": [{"name": "WORLD_SIZE", "value": "4"}]})
    assert [c.split(":")[0] for c in template_clashes(unchecked(train))] == ["spec.template.env[0].name"]
    hang = inference_spec(
        failurePolicy={"hangTimeoutSeconds": 60}, template={"env": [{"name": "CONVEYOR_HANG_TIMEOUT"}]}
    )
    assert len(template_clashes(unchecked(hang))) == 1
    # Without a hang timeout the operator does not set it: the user may.
    assert clashes(env=[{"name": "CONVEYOR_HANG_TIMEOUT", "value": "60"}]) == []


def test_volume_names_and_mount_paths_of_the_operator_and_twice_in_the_template() -> None:
    found = clashes(
        volumes=[{"name": "model", "emptyDir": {}}, {"name": "data", "emptyDir": {}}, {"name": "data"}],
        volumeMounts=[{"name": "data", "mountPath": "/ckpt"}, {"name": "data", "mountPath": "/data"}],
    )
    assert found == [
        "spec.template.volumes[0].name: 'model' is the name of the operator's own volume: rename it, and its "
        "volumeMounts",
        "spec.template.volumes[2].name: 'data' is set twice in spec.template.volumes: keep one",
        "spec.template.volumeMounts[0].mountPath: '/ckpt' is where the operator mounts its volume "
        "'checkpoint': choose another mountPath",
    ]


def test_an_image_pull_secret_twice() -> None:
    found = clashes(imagePullSecrets=[{"name": "regcred"}, {"name": "mirror"}, {"name": "regcred"}])
    assert found == [
        "spec.template.imagePullSecrets[2].name: 'regcred' is set twice in spec.template.imagePullSecrets: keep one"
    ]


def test_a_template_beside_the_operator_s_items_is_fine() -> None:
    spec = serve_spec(
        cache={"volume": "cache"},
        template={
            "env": [
                {"name": "HF_HOME", "value": "/data/hf"},
                {"name": "CONVEYOR_LOG_FORMAT", "value": "text"},
            ],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        },
    )
    assert template_clashes(parse_spec(spec)) == []


def test_the_reconcile_reports_invalid_spec_and_applies_nothing() -> None:
    # The spec model's message: it refuses the template before the backstop runs.
    body = job_body(inference_spec(template={"env": [{"name": "MASTER_PORT", "value": "1234"}]}))
    plan = plan_reconcile(JobView.from_body(body), [], at(0))
    status = k8s.status_patch(plan.status)
    assert plan.apply == [] and (status["phase"], status["reason"]) == ("Failed", "InvalidSpec")
    assert status["message"].startswith("spec.template.env[0].name: 'MASTER_PORT' is set by the operator")


def test_a_key_the_model_s_table_lacks_is_caught_by_the_backstop(monkeypatch: pytest.MonkeyPatch) -> None:
    # A rendering that outgrew the table: the model admits the template, the reconcile does not apply it.
    table = [
        template_keys.Owned(tuple(k for k in o.keys if k != "CONVEYOR_TEMPLATE_HASH"), o.when, o.cel)
        for o in template_keys.OPERATOR_ENV
    ]
    monkeypatch.setattr(template_keys, "OPERATOR_ENV", table)
    spec = inference_spec(template={"env": [{"name": "CONVEYOR_TEMPLATE_HASH", "value": "x"}]})
    parse_spec(spec)
    plan = plan_reconcile(JobView.from_body(job_body(spec)), [], at(0))
    status = k8s.status_patch(plan.status)
    assert plan.apply == [] and (status["phase"], status["reason"]) == ("Failed", "InvalidSpec")
    assert status["message"] == (
        "spec.template.env[0].name: 'CONVEYOR_TEMPLATE_HASH' is set by the operator: remove it "
        '(docs/design.md, "Worker environment")'
    )
