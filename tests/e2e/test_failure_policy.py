"""spec.failurePolicy through the real API server: an eviction (the Eviction API sets the pod's
DisruptionTarget condition) restarts the group without spending the restart budget; a job the worker
refuses (a model path that does not exist) fails at once with the worker's own message instead of
burning its retries; a rank that hangs is killed by its liveness probe and its group restarted (Hung),
and the job's outputs are complete and unrepeated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from tests.cluster.waiting import wait_for
from tests.e2e.host_volume import keep_on_the_host
from tests.e2e.test_inference_job import EXAMPLES, inference_job, results, single_process_reference
from tests.e2e.test_train_job import (
    STAGES,
    TP,
    committed_steps,
    job_manifest,
    job_status,
    reference_results,
    wait_succeeded,
)

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

CLAIM = {
    "apiVersion": "v1",
    "kind": "PersistentVolumeClaim",
    "metadata": {"name": "work"},
    "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
}


def events_of(cluster, namespace: str, name: str) -> list[str]:
    return [
        f"{e.reason}: {e.message}"
        for e in cluster.core.list_namespaced_event(namespace).items
        if e.involved_object.name == name
    ]


def test_an_evicted_pod_restarts_its_group_without_spending_the_budget(
    k8s_cluster, k8s_namespace, operator, tmp_path
):
    name = "evicted"
    job = job_manifest(name, tmp_path)
    job["spec"]["restartPolicy"] = {"backoffLimit": 0, "backoffSeconds": 1}  # no restart to spend
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump_all([CLAIM, job]))
    k8s_cluster.kubectl("apply", "-n", k8s_namespace, "-f", str(manifest))
    results = k8s_cluster.dir / "agent" / "pvc" / k8s_namespace / "work" / "results.json"
    wait_for(lambda: committed_steps(results) >= 2, "two committed steps", timeout=180, interval=0.2)

    eviction = client.V1Eviction(metadata=client.V1ObjectMeta(name=f"{name}-1", namespace=k8s_namespace))
    k8s_cluster.core.create_namespaced_pod_eviction(f"{name}-1", k8s_namespace, eviction)
    status = wait_succeeded(k8s_cluster, k8s_namespace, name, operator)

    assert json.loads(results.read_text()) == reference_results(STAGES * TP)
    events = events_of(k8s_cluster, k8s_namespace, name)
    ruled = [e for e in events if "failure rule default disruption" in e]
    assert ruled, events  # the restart happened, and the rule that made it free is named
    assert "restarts used 0/0" in ruled[0], ruled
    assert status.get("restarts", 0) == 0, json.dumps(status, indent=1)


def test_a_model_that_is_not_there_fails_the_job_at_once_with_the_workers_message(
    k8s_cluster, k8s_namespace, operator, tmp_path
):
    name = "nomodel"
    missing = tmp_path / "no-such-model"
    job = {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "PipelineJob",
        "metadata": {"name": name},
        "spec": {
            "mode": "inference",
            "device": "cpu",
            "model": {"path": str(missing), "dtype": "float32"},
            "parallelism": {"stages": 2, "tensorParallel": 1, "replicas": 1},
            "resources": {"gpus": 0, "requests": {"cpu": "100m", "memory": "256Mi"}},
            "inference": {
                "input": str(EXAMPLES / "tiny-prompts.jsonl"),
                "output": str(tmp_path / "out" / "results.jsonl"),
                "maxNewTokens": 4,
            },
            "checkpoint": {"path": str(tmp_path / "out" / "checkpoints")},
            "restartPolicy": {"backoffLimit": 5, "backoffSeconds": 1},
        },
    }
    keep_on_the_host(job["spec"], tmp_path / "out")
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    k8s_cluster.kubectl("apply", "-n", k8s_namespace, "-f", str(manifest))

    def failed() -> dict | None:
        status = job_status(k8s_cluster, k8s_namespace, name)
        return status if status.get("phase") == "Failed" else None

    status = wait_for(failed, "the job to fail", timeout=180, interval=0.5)
    said = json.dumps(status)
    assert str(missing) in said, said  # the worker's one-line cause reached the job's status
    assert status.get("restarts", 0) == 0, said  # refused, not retried five times
    assert not Path(tmp_path / "out" / "results.jsonl").exists()


def test_a_rank_that_hangs_is_restarted_and_the_job_completes_its_outputs_once(
    k8s_cluster, k8s_namespace, operator, tmp_path
):
    """The writer rank deadlocks (a test hook) after two prompts are committed: its liveness probe fails
    once hangTimeoutSeconds pass without progress, the container is killed, the operator restarts the
    group with reason Hung, and the restarted group finishes the rest: every prompt answered exactly once,
    as a single process answers it."""
    model, reference = single_process_reference(tmp_path)

    name, out = "hangs", tmp_path / "cluster"
    job = inference_job(name, model, out, 2, 1)
    job["spec"]["failurePolicy"] = {"hangTimeoutSeconds": 10}
    job["spec"]["template"]["env"] = [{"name": "CONVEYOR_TEST_WEDGE_AFTER_BEATS", "value": "20"}]
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    k8s_cluster.kubectl("apply", "-n", k8s_namespace, "-f", str(manifest))
    status = wait_succeeded(k8s_cluster, k8s_namespace, name, operator, timeout=400)

    assert results(out / "results.jsonl") == results(reference / "results.jsonl")  # each id once
    assert status.get("restarts") == 1, json.dumps(status, indent=1)
    # the writer's worker saw its rank hung (the liveness probe's 503) and said so; its peer's exit on the
    # lost connection may reach the operator first and name the group's failure
    writer_log = k8s_cluster.pod_logs(k8s_namespace, f"{name}-r0-0")
    assert '"worker stopped: a rank hung"' in writer_log and "Hung: no progress for" in writer_log
