"""Rendering: golden manifests per mode and layout, and the worker environment contract checked
end to end (operator's env -> conveyor.env.PodEnv -> ranks)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from conveyor.env import PodEnv
from conveyor.spec import parse_spec
from conveyor_operator import render

from tests.conftest import ROOT
from tests.operator import golden_cases
from tests.operator.builders import inference_spec, serve_spec, train_spec

JOB = golden_cases.JOB
CHART_VALUES = ROOT / "charts" / "conveyor" / "values.yaml"


@pytest.mark.parametrize("case", sorted(golden_cases.CASES))
def test_matches_golden(case: str) -> None:
    path = golden_cases.GOLDEN / f"{case}.yaml"
    assert path.exists(), "run `python tests/operator/golden_cases.py` to create it"
    assert golden_cases.dump(golden_cases.render_case(case)) == path.read_text(), (
        f"{path.name} differs from the rendering; if intended, regenerate with "
        "`python tests/operator/golden_cases.py` and review the diff"
    )


def _environ(sts: dict[str, Any], pod_index: int) -> dict[str, str]:
    """What the kubelet would give pod `pod_index` of this StatefulSet (downward API resolved)."""
    template = sts["spec"]["template"]
    fields = {  # the downward API fields the worker's env refers to
        f"metadata.labels['{render.POD_INDEX_LABEL}']": str(pod_index),
        **{f"metadata.annotations['{k}']": v for k, v in template["metadata"]["annotations"].items()},
    }
    out = {}
    for var in template["spec"]["containers"][0]["env"]:
        out[var["name"]] = (
            fields[var["valueFrom"]["fieldRef"]["fieldPath"]] if "valueFrom" in var else var["value"]
        )
    return out


@pytest.mark.parametrize(
    "spec_doc",
    [
        inference_spec(stages=3, tp=2, replicas=2),
        train_spec(stages=2, tp=2, replicas=3),
        serve_spec(stages=2, tp=1),
    ],
    ids=["inference", "train", "serve"],
)
def test_every_rank_gets_a_distinct_rank_and_rendezvous_of_its_group(spec_doc: dict[str, Any]) -> None:
    spec = parse_spec(spec_doc)
    p = spec.parallelism
    seen: dict[tuple[str, int], tuple[int, int]] = {}
    for sts in render.build_statefulsets(JOB, spec, {}, running=True):
        group = sts["metadata"]["name"]
        for index in range(sts["spec"]["replicas"]):
            pod = PodEnv.from_environ(_environ(sts, index))
            assert pod.master_addr == f"{group}-0.llm.ml.svc"
            labels = render.pod_stage_labels(
                spec, render.groups("llm", spec)[0 if spec.mode == "train" else pod.replica], index
            )
            assert labels == {render.REPLICA_LABEL: str(pod.replica), render.STAGE_LABEL: str(pod.stage)}
            for local in range(p.tensor_parallel):
                env = pod.rank_environ(local)
                key = (group if spec.mode != "train" else "job", int(env["RANK"]))
                assert key not in seen, f"rank {key} twice"
                seen[key] = (pod.replica, pod.stage)
                assert int(env["WORLD_SIZE"]) == pod.world_size
    per_world = p.stages * p.tensor_parallel * (p.replicas if spec.mode == "train" else 1)
    worlds = 1 if spec.mode == "train" else p.replicas
    assert len(seen) == per_world * worlds


def test_a_restart_or_a_new_spec_is_a_new_rendezvous() -> None:
    """Ranks of one generation share a rendezvous; another restart count or spec never meets them."""

    def rendezvous(spec_doc: dict[str, Any], restart: int) -> set[str]:
        spec = parse_spec(spec_doc)
        sts = render.build_statefulsets(
            JOB, spec, {render.groups("llm", spec)[0].name: restart}, running=True
        )[0]
        pods = [PodEnv.from_environ(_environ(sts, i)) for i in range(sts["spec"]["replicas"])]
        return {pod.rank_environ(local)["CONVEYOR_RENDEZVOUS"] for pod in pods for local in range(2)}

    first = rendezvous(inference_spec(stages=2, tp=2), 0)
    assert len(first) == 1
    assert rendezvous(inference_spec(stages=2, tp=2), 0) == first
    assert rendezvous(inference_spec(stages=2, tp=2), 1).isdisjoint(first)
    assert rendezvous(inference_spec(stages=2, tp=2, image="conveyor:next"), 0).isdisjoint(first)


def test_gpus_default_to_tensor_parallel_and_can_be_overridden() -> None:
    def gpus(spec_doc: dict[str, Any]) -> str | None:
        sts = render.build_statefulsets(JOB, parse_spec(spec_doc), {}, running=True)[0]
        limits = sts["spec"]["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        return limits.get("nvidia.com/gpu")

    assert gpus(inference_spec(tp=4)) == "4"
    assert gpus(inference_spec(tp=2, resources={"gpus": 8})) == "8"
    assert gpus(inference_spec(tp=2, device="cpu")) is None


def test_checkpoint_and_model_volumes_are_mounted_and_announced() -> None:
    sts = render.build_statefulsets(JOB, parse_spec(inference_spec()), {}, running=True)[0]
    pod = sts["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"checkpoint": "ckpt", "model": "models"}
    assert mounts["checkpoint"]["mountPath"] == "/ckpt" and mounts["model"]["readOnly"] is True
    env = _environ(sts, 0)
    assert (
        env["CONVEYOR_CHECKPOINT_DIR"] == "/ckpt"
        and env["CONVEYOR_TERMINATION_LOG"] == "/dev/termination-log"
    )
    assert pod["containers"][0]["terminationMessagePath"] == "/dev/termination-log"


def test_statefulsets_are_replaced_by_the_operator_not_rolled_by_kubernetes() -> None:
    for sts in render.build_statefulsets(JOB, parse_spec(train_spec()), {}, running=True):
        assert sts["spec"]["updateStrategy"] == {"type": "OnDelete"}
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        assert sts["metadata"]["ownerReferences"][0]["controller"] is True


def test_template_hash_ignores_operator_only_fields() -> None:
    base = parse_spec(inference_spec())
    same = [
        inference_spec(suspend=True),
        inference_spec(ttlSecondsAfterFinished=60),
        inference_spec(restartPolicy={"backoffLimit": 9}),
    ]
    for doc in same:
        assert render.template_hash(parse_spec(doc)) == render.template_hash(base)
    assert render.template_hash(parse_spec(inference_spec(image="other:1"))) != render.template_hash(base)
    assert render.template_hash(parse_spec(inference_spec(replicas=3))) != render.template_hash(base)
    # Serve replicas are independent endpoints: scaling does not roll the others.
    assert render.template_hash(parse_spec(serve_spec(replicas=1))) == render.template_hash(
        parse_spec(serve_spec(replicas=5))
    )


def test_restart_changes_env_and_annotation_but_not_the_hash() -> None:
    spec = parse_spec(inference_spec())
    g = render.groups("llm", spec)[0]
    a = render.build_statefulset(JOB, spec, g, restart=0, running=True)["spec"]["template"]["metadata"][
        "annotations"
    ]
    b = render.build_statefulset(JOB, spec, g, restart=2, running=True)["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert a[render.RESTART_ANNOTATION] == "0" and b[render.RESTART_ANNOTATION] == "2"
    assert a[render.TEMPLATE_HASH_ANNOTATION] == b[render.TEMPLATE_HASH_ANNOTATION]


def test_startup_probe_budget_follows_the_restart_policy() -> None:
    spec = parse_spec(inference_spec(restartPolicy={"startupTimeoutSeconds": 95}))
    sts = render.build_statefulsets(JOB, spec, {}, running=True)[0]
    probe = sts["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 95
    assert "livenessProbe" not in sts["spec"]["template"]["spec"]["containers"][0]


def test_pdb_and_serve_service_only_for_serve() -> None:
    kinds = [
        o["kind"] for o in render.build_all(JOB, parse_spec(inference_spec(replicas=3)), {}, running=True)
    ]
    assert "PodDisruptionBudget" not in kinds and kinds.count("Service") == 1
    serve = render.build_all(JOB, parse_spec(serve_spec(replicas=3)), {}, running=True)
    assert [o["kind"] for o in serve][:3] == ["Service", "Service", "PodDisruptionBudget"]
    assert render.build_pdb(JOB, parse_spec(serve_spec(replicas=1))) is None


@pytest.mark.parametrize(
    ("cache", "source"),
    [
        ({"volume": "compile-cache-pvc"}, {"persistentVolumeClaim": {"claimName": "compile-cache-pvc"}}),
        ({"path": "/cache"}, {"emptyDir": {}}),
    ],
    ids=["shared-volume", "empty-dir"],
)
def test_the_compile_cache_is_mounted_and_named_to_the_worker(
    cache: dict[str, Any], source: dict[str, Any]
) -> None:
    """spec.cache: every pod of every replica mounts the same cache and its worker is told where it is,
    so a second replica or a restarted group finds the first one's compiled kernels."""
    spec = parse_spec(inference_spec(stages=2, replicas=2, cache=cache))
    path = spec.cache.path if spec.cache is not None else ""
    for sts in render.build_statefulsets(JOB, spec, {}, running=True):
        pod = sts["spec"]["template"]["spec"]
        assert {"name": "compile-cache", **source} in pod["volumes"]
        assert {"name": "compile-cache", "mountPath": path} in pod["containers"][0]["volumeMounts"]
        assert PodEnv.from_environ(_environ(sts, 1)).compile_cache == path


def test_without_a_cache_spec_no_cache_volume_and_the_worker_uses_its_own_disk() -> None:
    spec = parse_spec(inference_spec())
    sts = render.build_statefulsets(JOB, spec, {}, running=True)[0]
    assert all(v["name"] != "compile-cache" for v in sts["spec"]["template"]["spec"]["volumes"])
    assert PodEnv.from_environ(_environ(sts, 0)).compile_cache is None


def test_each_tensor_parallel_rank_s_metrics_port_is_declared_for_the_pod_monitor() -> None:
    # Rank r of a pod serves its metrics on metricsPort + r; the chart's PodMonitor scrapes the declared
    # container ports named metrics / metrics-N (Prometheus discovers pods' ports, not open sockets).
    spec = parse_spec(serve_spec(tp=4, metricsPort=9500))
    sts = render.build_statefulsets(JOB, spec, {}, running=True)[0]
    ports = {p["name"]: p["containerPort"] for p in sts["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {
        "rendezvous": 29500,
        "metrics": 9500,
        "metrics-1": 9501,
        "metrics-2": 9502,
        "metrics-3": 9503,
        "http": 8000,
    }
    pod_monitor_ports = re.compile(
        yaml.safe_load(CHART_VALUES.read_text())["workerMetrics"]["podMonitor"]["portNameRegex"]
    )
    assert all(pod_monitor_ports.fullmatch(name) for name in ports if name.startswith("metrics"))
