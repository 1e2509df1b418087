"""Bad PipelineJobs are refused at admission, by the CRD's schema and CEL rules (`kubectl apply` fails and
names the field), not later by the operator; and the children the operator renders for edge layouts pass
the API server's own validation (server-side dry run under the operator's field manager), so an admitted
job never stalls with an apply error only the operator's log shows.

Dry runs only: nothing is stored, so the test needs no namespace of its own and no controllers.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from conveyor.spec import parse_spec
from conveyor_operator import render
from conveyor_operator.k8s import FIELD_MANAGER
from kubernetes import dynamic

from tests.cluster.fixtures import apply_crds
from tests.operator.builders import inference_spec, serve_spec, train_spec
from tests.operator.test_spec_bounds import LONGEST

pytestmark = [pytest.mark.cluster, pytest.mark.integration]

NAMESPACE = "default"  # dry runs store nothing; `default` exists in every cluster


def job(spec: dict[str, Any], name: str = "llm") -> dict[str, Any]:
    return {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "PipelineJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": copy.deepcopy(spec),
    }


def dry_run_apply(api: dynamic.DynamicClient, obj: dict[str, Any]) -> dict[str, Any]:
    resource = api.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    applied = api.server_side_apply(
        resource,
        body=obj,
        namespace=NAMESPACE,
        field_manager=FIELD_MANAGER,
        force_conflicts=True,
        dry_run="All",
    )
    return applied.to_dict()  # type: ignore[no-any-return]


def refusal(api: dynamic.DynamicClient, obj: dict[str, Any]) -> str | None:
    """The API server's message when it refuses ``obj``; None when it takes it."""
    try:
        dry_run_apply(api, obj)
    except Exception as err:
        body = getattr(err, "body", None)
        return str(json.loads(body).get("message", body)) if body else str(err)
    return None


@pytest.fixture(scope="module")
def api(k8s_cluster: Any) -> dynamic.DynamicClient:
    apply_crds(k8s_cluster)
    return dynamic.DynamicClient(k8s_cluster.api_client)


# (case, the job, a part of the API server's message)
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    (
        "name starts with a digit",
        job(inference_spec(), name="1llm"),
        "metadata.name must be a DNS-1035 label",
    ),
    ("name with a dot", job(inference_spec(), name="team.llm"), "metadata.name must be a DNS-1035 label"),
    ("master port is the metrics port", job(inference_spec(masterPort=9400)), "spec.masterPort is one of"),
    (
        "master port is rank 1's metrics port",
        job(serve_spec(tp=2, masterPort=9401)),
        "spec.masterPort is one",
    ),
    ("metrics ports past 65535", job(serve_spec(tp=2, metricsPort=65535)), "is above 65535"),
    ("serve port is the master port", job(serve_spec(serve={"port": 29500})), "spec.serve.port is"),
    ("serve port is a metrics port", job(serve_spec(serve={"port": 9400})), "spec.serve.port is"),
    ("cache at the checkpoint's path", job(inference_spec(cache={"path": "/ckpt"})), "must differ"),
    (
        "model at the checkpoint's path",
        job(inference_spec(model={"path": "/m", "volume": "m", "mountPath": "/ckpt"})),
        "must differ",
    ),
    ("cache on shared memory", job(serve_spec(cache={"path": "/dev/shm"})), "must differ"),
    (
        "exit code not a code",
        job(inference_spec(failurePolicy={"rules": [{"action": "FailJob", "onExitCodes": ["1", "oom"]}]})),
        "spec.failurePolicy.rules[0].onExitCodes[1]",
    ),
    (
        "failure rule without a matcher",
        job(inference_spec(failurePolicy={"rules": [{"action": "FailJob", "onReasons": []}]})),
        "a failurePolicy rule needs onExitCodes, onPodConditions or onReasons",
    ),
    (
        "topology key not a label key",
        job(inference_spec(placement={"topologyKey": "rack name"})),
        "topologyKey",
    ),
    (
        "fine-tuning without steps",
        job(train_spec(model={"path": "/m"}, train={"dataset": "/d.jsonl"})),
        "spec.train.steps is required with spec.train.dataset",
    ),
    (
        "global batch not a multiple",
        job(
            train_spec(model={"path": "/m"}, train={"dataset": "/d.jsonl", "steps": 3, "globalBatchSize": 3})
        ),
        "spec.train.globalBatchSize must be a multiple",
    ),
    ("resource quantity", job(inference_spec(resources={"requests": {"cpu": "lots"}})), "requests.cpu"),
    ("image with a trailing space", job(inference_spec(image="ghcr.io/org/worker:1 ")), "spec.image"),
    (
        "a request above its limit",
        job(inference_spec(resources={"requests": {"memory": "64Gi"}, "limits": {"memory": "32Gi"}})),
        "spec.resources.requests has a value above its spec.resources.limits",
    ),
    ("label value", job(inference_spec(template={"labels": {"team": "ml research"}})), "labels.team"),
    (
        "node selector value",
        job(inference_spec(template={"nodeSelector": {"gpu": "a" * 64}})),
        "nodeSelector.gpu",
    ),
    ("queue name", job(inference_spec(placement={"queueName": "team queue"})), "queueName"),
    (
        "a GPU request unlike the limit",
        job(serve_spec(tp=2, resources={"gpus": 4, "requests": {"nvidia.com/gpu": "2"}})),
        "spec.resources.requests['nvidia.com/gpu'] is not the pod's GPU limit",
    ),
    (
        "a GPU request without a limit on the CPU",
        job(inference_spec(device="cpu", resources={"requests": {"nvidia.com/gpu": "1"}})),
        "spec.resources.requests['nvidia.com/gpu'] is not the pod's GPU limit",
    ),
    (
        "priority class name",
        job(inference_spec(template={"priorityClassName": "High_Priority"})),
        "priorityClassName",
    ),
    (
        "model mount path empty",
        job(inference_spec(model={"path": "/m", "volume": "m", "mountPath": ""})),
        "mountPath",
    ),
    (
        "startup budget past the probe's int32",
        job(inference_spec(restartPolicy={"startupTimeoutSeconds": 99_999_999_999})),
        "startupTimeoutSeconds",
    ),
    (
        "a fine-tuning field in a script job",
        job(train_spec(train={"script": "/t.py", "seqLength": 1024})),
        "only apply to spec.train.dataset",
    ),
    (
        "a fine-tuning optimizer in a command job",
        job(train_spec(train={"command": ["x"], "optimizer": {"type": "SGD"}})),
        "only apply to spec.train.dataset",
    ),
    (
        "arguments in a fine-tuning job",
        job(train_spec(model={"path": "/m"}, train={"dataset": "/d.jsonl", "steps": 3, "args": ["--x"]})),
        "spec.train.args only applies to a script or command",
    ),
    (
        "train checkpoint claim empty",
        job(train_spec(checkpoint={"volume": "", "path": "/ckpt"})),
        "a train job needs spec.checkpoint.volume",
    ),
    (
        "an env var the operator sets",
        job(train_spec(template={"env": [{"name": "HF_HOME", "value": "/hf"}, {"name": "WORLD_SIZE"}]})),
        "spec.template.env sets a variable the operator sets itself",
    ),
    (
        "the hang timeout's variable with a hang timeout",
        job(
            inference_spec(
                failurePolicy={"hangTimeoutSeconds": 60},
                template={"env": [{"name": "CONVEYOR_HANG_TIMEOUT"}]},
            )
        ),
        "spec.template.env sets a variable the operator sets itself",
    ),
    (
        "a volume named as the checkpoint's",
        job(inference_spec(template={"volumes": [{"name": "checkpoint", "emptyDir": {}}]})),
        "spec.template.volumes names a volume the operator adds itself",
    ),
    (
        "a mount at the compile cache's path",
        job(
            serve_spec(
                cache={"path": "/cache"},
                template={
                    "volumes": [{"name": "data", "emptyDir": {}}],
                    "volumeMounts": [{"name": "data", "mountPath": "/cache"}],
                },
            )
        ),
        "spec.template.volumeMounts mounts at a path where the operator mounts a volume of its own",
    ),
    (
        "an env var twice",
        job(serve_spec(template={"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]})),
        '.spec.template.env: duplicate entries for key [name="A"]',
    ),
    (
        "a mount path twice",
        job(
            serve_spec(
                template={
                    "volumes": [{"name": "data", "emptyDir": {}}],
                    "volumeMounts": [
                        {"name": "data", "mountPath": "/d"},
                        {"name": "data", "mountPath": "/d"},
                    ],
                }
            )
        ),
        '.spec.template.volumeMounts: duplicate entries for key [mountPath="/d"]',
    ),
    (
        "a pull secret without a name",
        job(serve_spec(template={"imagePullSecrets": [{}]})),
        '.spec.template.imagePullSecrets: element 0: associative list with keys has an element that omits all key fields ["name"]',
    ),
]


@pytest.mark.parametrize(("case", "doc", "message"), REFUSED, ids=[c[0] for c in REFUSED])
def test_a_job_the_operator_cannot_run_is_refused_at_admission(
    api: dynamic.DynamicClient, case: str, doc: dict[str, Any], message: str
) -> None:
    refused = refusal(api, doc)
    assert refused is not None, f"{case}: admitted"
    assert message in refused, f"{case}: {refused}"


ADMITTED: list[tuple[str, dict[str, Any]]] = [
    ("inference", inference_spec()),
    ("inference, many stages and replicas", inference_spec(stages=64, tp=16, replicas=64)),
    ("serve", serve_spec()),
    ("serve, one pod a replica", serve_spec(stages=1, tp=8, replicas=3)),
    ("train", train_spec(stages=4, tp=2, replicas=2)),
    ("cpu", inference_spec(device="cpu", cache={"path": "/var/cache/conveyor"})),
    ("cache on a claim", inference_spec(cache={"volume": "compile-cache"})),
    ("cache under the checkpoints", train_spec(cache={"path": "/ckpt/cache"})),
    ("the longest durations", LONGEST),
    (
        "a script job with the fine-tuning fields at their defaults, written out",
        train_spec(
            train={"script": "/t.py", "seqLength": 512, "packing": True, "gradientClipping": 1, "seed": 0},
        ),
    ),
    (
        "a GPU limit the operator replaces",
        inference_spec(tp=2, resources={"limits": {"nvidia.com/gpu": "4"}}),
    ),
    (
        "a GPU request and limit of the user's own on the CPU",
        inference_spec(
            device="cpu", resources={"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}
        ),
    ),
    (
        "requests at their limits in other notations, and a GPU limit the operator replaces",
        inference_spec(
            tp=2,
            resources={
                "gpus": 2,
                "requests": {"cpu": "500m", "memory": "1Gi", "nvidia.com/gpu": "2"},
                "limits": {"cpu": "0.5", "memory": "1073741824", "nvidia.com/gpu": "1"},
            },
        ),
    ),
    (
        "GPU requests and limits equal to the operator's",
        serve_spec(
            tp=2,
            resources={"gpus": 4, "requests": {"nvidia.com/gpu": "4"}, "limits": {"nvidia.com/gpu": "4"}},
        ),
    ),
    (
        "labels, node selector, quantities and a queue",
        serve_spec(
            resources={"requests": {"cpu": "500m", "memory": "16Gi"}, "limits": {"memory": "1e11"}},
            template={
                "labels": {"team": "ml.research_1", "app.example.com/tier": ""},
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                "annotations": {"example.com/owner": "ml research"},
            },
            placement={"queueName": "team-a"},
        ),
    ),
    (
        "fine-tuning, failure rules and placement",
        train_spec(
            model={"path": "/m"},
            train={"dataset": "/d.jsonl", "steps": 3, "microBatchSize": 2, "globalBatchSize": 8},
            failurePolicy={"rules": [{"action": "FailJob", "onExitCodes": ["3", "128 - 255"]}]},
            placement={"topologyKey": "topology.kubernetes.io/zone", "exclusive": True},
        ),
    ),
    (
        "model claim empty: no model mount",
        inference_spec(model={"path": "/ckpt/m", "volume": "", "mountPath": "/ckpt"}),
    ),
    (
        "template items beside the operator's, and those it sets only in other jobs",
        inference_spec(
            model={"path": "/models/m"},
            template={
                "env": [
                    {"name": "WORLD_SIZE", "value": "1"},
                    {"name": "CONVEYOR_HANG_TIMEOUT", "value": "60"},
                    {"name": "CONVEYOR_LOG_FORMAT", "value": "text"},
                ],
                "volumes": [{"name": "models", "emptyDir": {}}, {"name": "compile-cache", "emptyDir": {}}],
                "volumeMounts": [
                    {"name": "models", "mountPath": "/models"},
                    {"name": "compile-cache", "mountPath": "/var/cache/conveyor"},
                ],
                "imagePullSecrets": [{"name": "regcred"}, {"name": "mirror"}],
            },
        ),
    ),
]


@pytest.mark.parametrize(("case", "spec"), ADMITTED, ids=[c[0] for c in ADMITTED])
def test_an_admitted_job_renders_children_the_api_server_takes(
    api: dynamic.DynamicClient, case: str, spec: dict[str, Any]
) -> None:
    doc = job(spec, name="a" * 46)  # the longest name: every child's name and label value at its limit
    stored = dry_run_apply(api, doc)  # with the CRD's defaults, as the operator reads it
    ref = render.JobRef(name=doc["metadata"]["name"], namespace=NAMESPACE, uid="0000-1111")
    children = render.build_all(ref, parse_spec(stored["spec"]), {}, running=True)
    refused = {
        f"{o['kind']} {o['metadata']['name']}": refusal(api, o) for o in children if o["kind"] != "PodGroup"
    }
    assert {k: v for k, v in refused.items() if v is not None} == {}, case
