"""A PipelineJob end to end through the real API server and controller manager: the operator (a local
process) renders StatefulSets, the controller manager makes pods, the agent runs `conveyor worker` in them,
ranks meet through the headless Service's names, and the job ends Succeeded with the single-process result.
Then the same job under faults: a worker process killed, a pod deleted, the operator killed mid-reconcile.

The job is in train mode (2 stages x 2 tensor-parallel ranks = a world of 4 over 2 pods) with a tiny
all-reduce script, because it needs no model; the inference job is in test_inference_job.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster.waiting import wait_for
from tests.e2e.conftest import Operator

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

HERE = Path(__file__).resolve().parent
GROUP, VERSION, PLURAL = "conveyor.dev", "v1alpha1", "pipelinejobs"
STEPS, STAGES, TP = 6, 2, 2


def job_manifest(name: str, work: Path) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PipelineJob",
        "metadata": {"name": name},
        "spec": {
            "mode": "train",
            "device": "cpu",
            "parallelism": {"stages": STAGES, "tensorParallel": TP, "replicas": 1},
            "resources": {"gpus": 0, "requests": {"cpu": "100m", "memory": "256Mi"}},
            # The agent maps the claim to a host directory; the script reads CONVEYOR_CHECKPOINT_DIR.
            "checkpoint": {"volume": "work", "path": "/checkpoints", "every": 1, "keep": 2},
            "train": {"script": str(HERE / "allreduce_train.py"), "steps": STEPS},
            "restartPolicy": {"backoffLimit": 4, "backoffSeconds": 1},
        },
    }


def reference_results(world: int) -> list[dict]:
    """What one process computing the same sums gets."""
    return [{"step": s, "value": float((s + 1) * world * (world + 1) // 2)} for s in range(STEPS)]


def submit(cluster, namespace: str, name: str, tmp_path: Path) -> Path:
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "work"},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump_all([claim, job_manifest(name, tmp_path)]))
    cluster.kubectl("apply", "-n", namespace, "-f", str(manifest))
    # The agent keeps a claim's files in one directory per namespace and claim.
    return cluster.dir / "agent" / "pvc" / namespace / "work" / "results.json"


def job_status(cluster, namespace: str, name: str) -> dict:
    return (
        cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status")
        or {}
    )


def wait_succeeded(cluster, namespace: str, name: str, op: Operator | None, timeout: float = 240) -> dict:
    def operator_log() -> str:
        if op is None:  # the operator runs as a pod of the Helm chart
            return "".join(
                cluster.pod_logs(namespace, p.metadata.name)
                for p in cluster.core.list_namespaced_pod(
                    namespace,
                    label_selector="app.kubernetes.io/name=conveyor,app.kubernetes.io/component=operator",
                ).items
            )[-3000:]
        return op.log.read_text()[-3000:]

    def done():
        status = job_status(cluster, namespace, name)
        if status.get("phase") == "Failed":
            raise AssertionError(f"job failed: {json.dumps(status, indent=1)}\n{operator_log()}")
        return status if status.get("phase") == "Succeeded" else None

    try:
        return wait_for(done, f"PipelineJob {name} to succeed", timeout=timeout, interval=1.0)
    except AssertionError:
        pods = cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout
        logs = {p: cluster.pod_logs(namespace, p)[-2000:] for p in (f"{name}-0", f"{name}-1")}
        raise AssertionError(
            f"status: {json.dumps(job_status(cluster, namespace, name), indent=1)}\npods:\n{pods}\n"
            f"pod logs: {json.dumps(logs, indent=1)}\noperator log tail:\n{operator_log()}"
        ) from None


def assert_clean_children(cluster, namespace: str, name: str, ignore_pods: str | None = None) -> None:
    """Exactly one StatefulSet and one Service for the job, both owned by it, and every pod owned by that
    StatefulSet: no duplicates, no orphans. `ignore_pods` selects pods that are not the job's (an operator)."""
    uid = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)["metadata"][
        "uid"
    ]
    sets = cluster.apps.list_namespaced_stateful_set(namespace).items
    services = [
        s
        for s in cluster.core.list_namespaced_service(namespace).items
        if not s.metadata.name.startswith("conveyor")
    ]
    assert [s.metadata.name for s in sets] == [name]
    assert [s.metadata.name for s in services] == [name]
    for obj in [*sets, *services]:
        assert [o.uid for o in obj.metadata.owner_references or []] == [uid], obj.metadata.name
    ignored = set()
    if ignore_pods:
        ignored = {
            p.metadata.uid
            for p in cluster.core.list_namespaced_pod(namespace, label_selector=ignore_pods).items
        }
    for pod in cluster.core.list_namespaced_pod(namespace).items:
        if pod.metadata.uid not in ignored:
            owners = [o.name for o in pod.metadata.owner_references or []]
            assert owners == [name], (pod.metadata.name, owners)


def committed_steps(results: Path) -> int:
    with contextlib.suppress(OSError, ValueError):
        return len(json.loads(results.read_text()))
    return 0


def rank_pids(namespace: str, job: str) -> list[int]:
    """Processes of the job's rank entry (`python -m conveyor.rank`), found by their environment (the agent's
    termination-log path names the pod's namespace, unique per test)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            environ = (proc / "environ").read_bytes().split(b"\0")
            mine = f"CONVEYOR_JOB={job}".encode() in environ and namespace.encode() in b"\0".join(environ)
            if mine and b"conveyor.rank" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
    return pids


def test_train_job_runs_to_the_single_process_result(k8s_cluster, k8s_namespace, operator, tmp_path):
    results = submit(k8s_cluster, k8s_namespace, "allreduce", tmp_path)
    status = wait_succeeded(k8s_cluster, k8s_namespace, "allreduce", operator)
    assert json.loads(results.read_text()) == reference_results(STAGES * TP)
    assert_clean_children(k8s_cluster, k8s_namespace, "allreduce")
    assert status.get("phase") == "Succeeded"


@pytest.mark.parametrize("fault", ["kill-worker-process", "delete-pod"])
def test_train_job_survives_a_lost_worker(k8s_cluster, k8s_namespace, operator, tmp_path, fault):
    results = submit(k8s_cluster, k8s_namespace, "faulty", tmp_path)
    wait_for(lambda: committed_steps(results) >= 2, "two committed steps", timeout=180, interval=0.2)
    if fault == "kill-worker-process":
        pids = wait_for(lambda: rank_pids(k8s_namespace, "faulty"), "the job's rank processes")
        os.kill(pids[-1], signal.SIGKILL)
    else:
        k8s_cluster.core.delete_namespaced_pod("faulty-1", k8s_namespace)
    status = wait_succeeded(k8s_cluster, k8s_namespace, "faulty", operator)
    assert json.loads(results.read_text()) == reference_results(STAGES * TP)
    assert_clean_children(k8s_cluster, k8s_namespace, "faulty")
    # The pods' own restart counts (the kubelet's view, kept by the agent) show the lost worker...
    pod_restarts = sum(
        c.restart_count
        for p in k8s_cluster.core.list_namespaced_pod(k8s_namespace).items
        for c in p.status.container_statuses or []
    )
    # ...and the operator counts a group restart in the job's status: a worker restarted in place is a
    # group failure like a deleted pod. One lost worker is one restart, not one per pod it took down.
    restarts = sum(g.get("restarts", 0) for g in status.get("groups", []))
    assert restarts == 1, (
        f"expected one group restart: {json.dumps(status, indent=1)} (pod restarts {pod_restarts})"
    )


def test_train_job_survives_the_operator_killed_mid_reconcile(k8s_cluster, k8s_namespace, operator, tmp_path):
    results = submit(k8s_cluster, k8s_namespace, "orphan", tmp_path)
    # Kill it as soon as it has started writing children, then start a fresh one.
    wait_for(
        lambda: k8s_cluster.core.list_namespaced_service(k8s_namespace).items,
        "the job's Service",
        interval=0.05,
    )
    operator.kill()
    time.sleep(1.0)
    operator.start()
    wait_succeeded(k8s_cluster, k8s_namespace, "orphan", operator)
    assert json.loads(results.read_text()) == reference_results(STAGES * TP)
    assert_clean_children(k8s_cluster, k8s_namespace, "orphan")
