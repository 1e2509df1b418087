"""Malformed PipelineJobs: each is refused with a message that names the field and the fix (the
pydantic path, shared by the operator, the worker and `conveyor run`)."""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from conveyor.spec import SpecError, parse_job

from tests.conftest import conveyor_cmd, subprocess_env
from tests.operator.builders import inference_spec, serve_spec, train_spec

Doc = dict[str, Any]


def doc(spec: Doc, name: str = "llm") -> Doc:
    return {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "PipelineJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def inf(**changes: Any) -> Doc:
    return doc(inference_spec(**changes))


def edit(base: Doc, path: str, value: Any) -> Doc:
    """Set (or, with value=DELETE, remove) a dotted path in a copy of the document."""
    out = copy.deepcopy(base)
    node = out
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return out


DELETE = object()
BASE = inf()

CASES: list[tuple[str, Callable[[], Doc], list[str]]] = [
    ("mode missing", lambda: edit(BASE, "spec.mode", DELETE), ["spec.mode: required field is missing"]),
    (
        "mode unknown",
        lambda: edit(BASE, "spec.mode", "batch"),
        ["spec.mode:", "'inference', 'serve' or 'train'"],
    ),
    (
        "unknown spec field",
        lambda: edit(BASE, "spec.stagess", 2),
        ["spec.stagess: unknown field", "kubectl explain"],
    ),
    (
        "unknown nested field",
        lambda: edit(BASE, "spec.parallelism.stage", 2),
        ["spec.parallelism.stage: unknown field; remove it"],
    ),
    (
        "stages 0",
        lambda: edit(BASE, "spec.parallelism.stages", 0),
        ["spec.parallelism.stages:", "greater than or equal to 1", "(got 0)"],
    ),
    (
        "stages 65",
        lambda: edit(BASE, "spec.parallelism.stages", 65),
        ["spec.parallelism.stages:", "less than or equal to 64"],
    ),
    (
        "stages text",
        lambda: edit(BASE, "spec.parallelism.stages", "two"),
        ["spec.parallelism.stages:", "integer"],
    ),
    (
        "tp 0",
        lambda: edit(BASE, "spec.parallelism.tensorParallel", 0),
        ["spec.parallelism.tensorParallel:", "greater than or equal to 1"],
    ),
    (
        "tp 17",
        lambda: edit(BASE, "spec.parallelism.tensorParallel", 17),
        ["spec.parallelism.tensorParallel:", "less than or equal to 16"],
    ),
    (
        "replicas -1",
        lambda: edit(BASE, "spec.parallelism.replicas", -1),
        ["spec.parallelism.replicas:", "greater than or equal to 0"],
    ),
    (
        "replicas 0 for batch",
        lambda: edit(BASE, "spec.parallelism.replicas", 0),
        ["spec.parallelism.replicas is 0", "only serve jobs scale to zero", "replicas >= 1"],
    ),
    (
        "microBatches 0",
        lambda: edit(BASE, "spec.parallelism.microBatches", 0),
        ["spec.parallelism.microBatches:"],
    ),
    (
        "partition method",
        lambda: edit(BASE, "spec.parallelism.partitionMethod", "random"),
        ["spec.parallelism.partitionMethod:", "parameters|uniform|type:"],
    ),
    (
        "partition type not a regex",
        lambda: edit(BASE, "spec.parallelism.partitionMethod", "type:Block["),
        [
            "spec.parallelism.partitionMethod:",
            "'type:Block[': REGEX after `type:` is not a regular expression",
        ],
    ),
    (
        "inference section missing",
        lambda: edit(BASE, "spec.inference", DELETE),
        ["spec.inference is required when spec.mode is 'inference'", "add a `inference:` section"],
    ),
    (
        "other mode's section",
        lambda: edit(BASE, "spec.train", {"script": "t.py"}),
        ["spec.train is set but spec.mode is 'inference'", "remove spec.train or set mode: train"],
    ),
    ("model missing", lambda: edit(BASE, "spec.model", DELETE), ["spec.model is required", "add model.path"]),
    (
        "model path empty",
        lambda: edit(BASE, "spec.model.path", ""),
        ["spec.model.path:", "at least 1 character"],
    ),
    ("model format", lambda: edit(BASE, "spec.model.format", "gguf"), ["spec.model.format:", "'hf'"]),
    ("model dtype", lambda: edit(BASE, "spec.model.dtype", "int8"), ["spec.model.dtype:", "'bfloat16'"]),
    (
        "kv cache dtype",
        lambda: edit(BASE, "spec.model.kvCacheDtype", "int4"),
        ["spec.model.kvCacheDtype:", "'auto' or 'fp8'"],
    ),
    (
        "kv cache dtype in train mode",
        lambda: edit(
            edit(doc(train_spec()), "spec.model", {"path": "/m", "kvCacheDtype": "fp8"}),
            "spec.train",
            {"dataset": "/d.jsonl", "steps": 3},
        ),
        ["spec.model.kvCacheDtype only applies to inference and serve", "remove it"],
    ),
    (
        "input missing",
        lambda: edit(BASE, "spec.inference.input", DELETE),
        ["spec.inference.input: required field"],
    ),
    (
        "maxNewTokens 0",
        lambda: edit(BASE, "spec.inference.maxNewTokens", 0),
        ["spec.inference.maxNewTokens:", "greater than or equal to 1"],
    ),
    (
        "batchSize huge",
        lambda: edit(BASE, "spec.inference.batchSize", 5000),
        ["spec.inference.batchSize:", "less than or equal to 4096"],
    ),
    (
        "temperature negative",
        lambda: edit(BASE, "spec.inference.sampling", {"temperature": -1}),
        ["spec.inference.sampling.temperature:", "greater than or equal to 0"],
    ),
    (
        "topP zero",
        lambda: edit(BASE, "spec.inference.sampling", {"topP": 0}),
        ["spec.inference.sampling.topP:", "greater than 0"],
    ),
    (
        "topK negative",
        lambda: edit(BASE, "spec.inference.sampling", {"topK": -1}),
        ["spec.inference.sampling.topK:"],
    ),
    (
        "train without script",
        lambda: edit(doc(train_spec()), "spec.train.script", DELETE),
        ["spec.train: set exactly one of script"],
    ),
    (
        "train without checkpoint",
        lambda: edit(doc(train_spec()), "spec.checkpoint", DELETE),
        ["spec.checkpoint is required when spec.mode is 'train'"],
    ),
    (
        "checkpoint keep 0",
        lambda: edit(BASE, "spec.checkpoint.keep", 0),
        ["spec.checkpoint.keep:", "greater than or equal to 1"],
    ),
    (
        "checkpoint every 0",
        lambda: edit(BASE, "spec.checkpoint.every", 0),
        ["spec.checkpoint.every:", "greater than or equal to 1"],
    ),
    (
        "backoffLimit negative",
        lambda: edit(BASE, "spec.restartPolicy.backoffLimit", -1),
        ["spec.restartPolicy.backoffLimit:", "greater than or equal to 0"],
    ),
    (
        "backoff above its cap",
        lambda: edit(BASE, "spec.restartPolicy", {"backoffSeconds": 50, "maxBackoffSeconds": 5}),
        [
            "spec.restartPolicy:",
            "maxBackoffSeconds (5) is below backoffSeconds (50)",
            "raise maxBackoffSeconds",
        ],
    ),
    (
        "startup timeout tiny",
        lambda: edit(BASE, "spec.restartPolicy.startupTimeoutSeconds", 5),
        ["spec.restartPolicy.startupTimeoutSeconds:", "greater than or equal to 10"],
    ),
    (
        "fewer GPUs than TP",
        lambda: edit(edit(BASE, "spec.parallelism.tensorParallel", 4), "spec.resources", {"gpus": 2}),
        [
            "spec.resources.gpus (2) is below spec.parallelism.tensorParallel (4)",
            "set gpus >= tensorParallel",
        ],
    ),
    (
        "a GPU request unlike the limit",
        lambda: edit(
            edit(BASE, "spec.parallelism.tensorParallel", 2),
            "spec.resources",
            {"requests": {"nvidia.com/gpu": "4"}},
        ),
        [
            "spec.resources.requests['nvidia.com/gpu'] (4) is not the pod's GPU limit (2:",
            "set spec.resources.gpus and remove nvidia.com/gpu from spec.resources.requests",
        ],
    ),
    (
        "a GPU request without a limit on the CPU",
        lambda: edit(
            edit(BASE, "spec.device", "cpu"), "spec.resources", {"requests": {"nvidia.com/gpu": "1"}}
        ),
        ["spec.resources.requests['nvidia.com/gpu'] (1) is not the pod's GPU limit (none:"],
    ),
    (
        "gpus 17",
        lambda: edit(BASE, "spec.resources", {"gpus": 17}),
        ["spec.resources.gpus:", "less than or equal to 16"],
    ),
    (
        "pull policy",
        lambda: edit(BASE, "spec.imagePullPolicy", "Sometimes"),
        ["spec.imagePullPolicy:", "'Always'"],
    ),
    ("device", lambda: edit(BASE, "spec.device", "tpu"), ["spec.device:", "'auto', 'cuda' or 'cpu'"]),
    ("image empty", lambda: edit(BASE, "spec.image", ""), ["spec.image:", "at least 1 character"]),
    (
        "master port low",
        lambda: edit(BASE, "spec.masterPort", 80),
        ["spec.masterPort:", "greater than or equal to 1024"],
    ),
    (
        "metrics port high",
        lambda: edit(BASE, "spec.metricsPort", 70000),
        ["spec.metricsPort:", "less than or equal to 65535"],
    ),
    (
        "master port is the metrics port",
        lambda: edit(BASE, "spec.masterPort", 9400),
        ["spec.masterPort (9400) is one of the metrics ports 9400-9400", "change masterPort or metricsPort"],
    ),
    (
        "master port is a tensor-parallel rank's metrics port",
        lambda: edit(edit(BASE, "spec.parallelism.tensorParallel", 4), "spec.masterPort", 9403),
        ["spec.masterPort (9403) is one of the metrics ports 9400-9403", "one per tensor-parallel rank"],
    ),
    (
        "metrics ports past 65535",
        lambda: edit(edit(BASE, "spec.parallelism.tensorParallel", 2), "spec.metricsPort", 65535),
        ["spec.metricsPort (65535) + tensorParallel (2) - 1 is above 65535", "set metricsPort <= 65534"],
    ),
    (
        "serve port is the master port",
        lambda: edit(doc(serve_spec()), "spec.serve.port", 29500),
        ["spec.serve.port (29500) is spec.masterPort", "choose another serve.port"],
    ),
    (
        "serve port is a metrics port",
        lambda: edit(doc(serve_spec(tp=2)), "spec.serve.port", 9401),
        ["spec.serve.port (9401) is the metrics ports 9400-9401", "choose another serve.port"],
    ),
    (
        "cache at the checkpoint's path",
        lambda: edit(BASE, "spec.cache", {"path": "/ckpt"}),
        ["spec.cache.path (/ckpt) is also spec.checkpoint.path's mount path", "change spec.cache.path"],
    ),
    (
        "model mounted at the checkpoint's path",
        lambda: edit(BASE, "spec.model.mountPath", "/ckpt"),
        [
            "spec.model.mountPath (/ckpt) is also spec.checkpoint.path's mount path",
            "change spec.model.mountPath",
        ],
    ),
    (
        "cache on shared memory",
        lambda: edit(BASE, "spec.cache", {"volume": "cache", "path": "/dev/shm"}),
        ["spec.cache.path (/dev/shm) is also the shared memory volume's mount path"],
    ),
    (
        "ttl negative",
        lambda: edit(BASE, "spec.ttlSecondsAfterFinished", -5),
        ["spec.ttlSecondsAfterFinished:", "greater than or equal to 0"],
    ),
    ("suspend text", lambda: edit(BASE, "spec.suspend", "maybe"), ["spec.suspend:", "boolean"]),
    (
        "serve port 0",
        lambda: edit(doc(serve_spec()), "spec.serve.port", 0),
        ["spec.serve.port:", "greater than or equal to 1"],
    ),
    (
        "template typo",
        lambda: edit(BASE, "spec.template.nodeSelectorr", {"a": "b"}),
        ["spec.template.nodeSelectorr: unknown field"],
    ),
    (
        "nodeSelector values",
        lambda: edit(BASE, "spec.template.nodeSelector", {"gpu": 1}),
        ["spec.template.nodeSelector.gpu:", "string"],
    ),
    (
        "resource quantity",
        lambda: edit(BASE, "spec.resources", {"requests": {"cpu": "4 cores"}}),
        ["spec.resources.requests.cpu:", "'4 cores' is not a Kubernetes quantity", "`500m`"],
    ),
    (
        "a request above its limit",
        lambda: edit(
            BASE,
            "spec.resources",
            {"requests": {"cpu": "2", "memory": "64Gi"}, "limits": {"cpu": "2000m", "memory": "32Gi"}},
        ),
        [
            "spec.resources.requests['memory'] (64Gi) is above spec.resources.limits['memory'] (32Gi)",
            "lower the request or raise the limit",
        ],
    ),
    (
        "image with a trailing space",
        lambda: edit(BASE, "spec.image", "ghcr.io/org/worker:1 "),
        ["spec.image:", "leading or trailing whitespace, which Kubernetes refuses: remove it"],
    ),
    (
        "resource name",
        lambda: edit(BASE, "spec.resources", {"limits": {"gpu memory": "8Gi"}}),
        ["spec.resources.limits:", "'gpu memory' is not a resource name", "`nvidia.com/gpu`"],
    ),
    (
        "label value",
        lambda: edit(BASE, "spec.template.labels", {"team": "ml research"}),
        ["spec.template.labels.team:", "'ml research' is not a label value", "starting and ending"],
    ),
    (
        "label value too long",
        lambda: edit(BASE, "spec.template.labels", {"team": "a" * 64}),
        ["spec.template.labels.team:", "at most 63 characters"],
    ),
    (
        "label key",
        lambda: edit(BASE, "spec.template.labels", {"-team": "ml"}),
        ["spec.template.labels:", "'-team' is not a label key", "`prefix/name`"],
    ),
    (
        "node selector value",
        lambda: edit(BASE, "spec.template.nodeSelector", {"gpu": "h100 sxm"}),
        ["spec.template.nodeSelector.gpu:", "is not a label value"],
    ),
    (
        "label key prefix too long",
        lambda: edit(BASE, "spec.template.labels", {"a" * 254 + "/team": "ml"}),
        ["spec.template.labels:", "is not a label key", "at most 253 characters"],
    ),
    (
        "priority class name",
        lambda: edit(BASE, "spec.template.priorityClassName", "High_Priority"),
        ["spec.template.priorityClassName:", "'High_Priority' is not an object name"],
    ),
    (
        "service account name",
        lambda: edit(BASE, "spec.template.serviceAccountName", "Trainer"),
        ["spec.template.serviceAccountName:", "'Trainer' is not an object name"],
    ),
    (
        "model mount path empty",
        lambda: edit(BASE, "spec.model.mountPath", ""),
        ["spec.model.mountPath:", "at least 1 character"],
    ),
    (
        "annotation key",
        lambda: edit(BASE, "spec.template.annotations", {"owner team": "ml"}),
        ["spec.template.annotations:", "'owner team' is not an annotation key"],
    ),
    (
        "a label of the operator's",
        lambda: edit(BASE, "spec.template.labels", {"conveyor.dev/serving": "true"}),
        ["spec.template.labels:", "'conveyor.dev/serving': keys under conveyor.dev/ are the operator's own"],
    ),
    (
        "an annotation of the operator's",
        lambda: edit(BASE, "spec.template.annotations", {"conveyor.dev/restart": "0"}),
        ["spec.template.annotations:", "'conveyor.dev/restart': keys under conveyor.dev/", "remove it"],
    ),
    (
        "queue name",
        lambda: edit(BASE, "spec.placement", {"queueName": "team queue"}),
        ["spec.placement.queueName:", "is not a label value"],
    ),
    ("name pattern", lambda: edit(BASE, "metadata.name", "LLM_Job"), ["metadata.name:", "[a-z0-9]"]),
    (
        "name starts with a digit",
        lambda: edit(BASE, "metadata.name", "1llm"),
        ["metadata.name:", "not a DNS-1035 label", "starting with a letter"],
    ),
    (
        "name with a dot",
        lambda: edit(BASE, "metadata.name", "team.llm"),
        ["metadata.name:", "not a DNS-1035 label", "the job's Service takes its name"],
    ),
    (
        "name too long",
        lambda: edit(BASE, "metadata.name", "a" * 47),
        ["metadata.name:", "at most 46 characters"],
    ),
    (
        "apiVersion",
        lambda: edit(BASE, "apiVersion", "conveyor.dev/v2"),
        ["apiVersion:", "conveyor.dev/v1alpha1"],
    ),
    ("spec missing", lambda: edit(BASE, "spec", DELETE), ["spec: required field is missing"]),
]


def test_there_are_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize(("name", "make", "expected"), CASES, ids=[c[0] for c in CASES])
def test_malformed_spec_is_refused_with_its_field_and_fix(
    name: str, make: Callable[[], Doc], expected: list[str]
) -> None:
    with pytest.raises(SpecError) as err:
        parse_job(make())
    message = str(err.value)
    for part in expected:
        assert part in message, f"{name}: {part!r} not in:\n{message}"
    assert "Traceback" not in message and "pydantic" not in message.lower()


def test_every_problem_is_reported_at_once() -> None:
    bad = edit(edit(BASE, "spec.parallelism.stages", 0), "spec.masterPort", 1)
    lines = str(pytest.raises(SpecError, parse_job, bad).value).splitlines()
    assert (
        len(lines) == 2
        and lines[0].startswith("spec.parallelism.stages")
        and lines[1].startswith("spec.masterPort")
    )


def test_requests_at_or_below_their_limits_in_any_notation_pass() -> None:
    resources = {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "0.5", "memory": "1073741824"},
    }
    parse_job(doc(inference_spec(resources=resources)))
    # A GPU limit of the user's own is replaced by the operator's (spec.resources.gpus): not compared.
    gpus = {"gpus": 2, "requests": {"nvidia.com/gpu": "2"}, "limits": {"nvidia.com/gpu": "1"}}
    parse_job(doc(inference_spec(tp=2, resources=gpus)))


def test_valid_examples_pass() -> None:
    for spec in (inference_spec(), train_spec(), serve_spec(), serve_spec(replicas=0)):
        parse_job(doc(spec))


def test_conveyor_run_refuses_a_bad_job_before_starting_anything(tmp_path: Any) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(edit(BASE, "spec.parallelism.stages", 0)))
    proc = subprocess.run(
        conveyor_cmd("run", str(path)), env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "spec.parallelism.stages" in proc.stderr and "Traceback" not in proc.stderr


def test_a_job_file_reads_exponent_numbers_as_kubectl_does(tmp_path: Any) -> None:
    # PyYAML alone reads `lr: 1e-5` (no dot) as the string "1e-5"; the API server's YAML reads a float,
    # and a string reached the optimizer, which failed comparing it
    from conveyor.spec import load_job

    path = tmp_path / "job.yaml"
    path.write_text(
        "apiVersion: conveyor.dev/v1alpha1\nkind: PipelineJob\nmetadata: {name: t}\n"
        "spec:\n  mode: train\n  model: {path: /m}\n  checkpoint: {path: /c}\n  train:\n    dataset: /d.jsonl\n    steps: 4\n"
        "    optimizer: {type: AdamW, params: {lr: 1e-5, eps: 1E-8, betas: [0.9, 0.95], tag: '3e-4'}}\n"
    )
    params = load_job(path).spec.train.optimizer.params  # type: ignore[union-attr]
    assert params == {"lr": 1e-5, "eps": 1e-8, "betas": [0.9, 0.95], "tag": "3e-4"}
    assert isinstance(params["lr"], float)
