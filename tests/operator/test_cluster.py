"""The operator against a real API server (the local control plane of tests/cluster/): the CRD's
admission rules, and `conveyor operator` creating a job's objects and restarting a group whose pod
failed, with status and Events to match. Fixtures (`k8s_cluster`, `k8s_namespace`) come from
tests/cluster/fixtures.py through tests/conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conveyor_operator import k8s

from tests.conftest import conveyor_cmd, subprocess_env
from tests.operator.builders import inference_spec, serve_spec, train_spec

pytestmark = [pytest.mark.cluster, pytest.mark.integration]
GROUP, VERSION, PLURAL = "conveyor.dev", "v1alpha1", "pipelinejobs"


def eventually(check: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as err:  # not there yet
            last = err
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what or check}: last saw {last!r}")


def manifest(name: str, namespace: str, spec: dict[str, Any]) -> str:
    doc = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PipelineJob",
        "metadata": {"name": name, "namespace": namespace},
    }
    return yaml.safe_dump({**doc, "spec": spec})


def delete_jobs(cluster: Any, namespace: str) -> None:
    """Delete the namespace's PipelineJobs while the operator still runs: it removes its finalizer (the
    resync timer's), so the namespace can go afterwards."""
    cluster.kubectl("delete", PLURAL, "--all", "-n", namespace, "--wait=false", check=False)
    eventually(
        lambda: not cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"],
        timeout=60,
        what="the PipelineJobs to be deleted",
    )


REJECTED = [
    ({"mode": "train", "train": {"script": "/t.py"}}, "a train job needs spec.checkpoint.volume"),
    ({**inference_spec(), "serve": {}}, "only the section of spec.mode may be set"),
    ({**inference_spec(), "stagess": 2}, 'unknown field "spec.stagess"'),
    (
        {**inference_spec(tp=4), "resources": {"gpus": 2}},
        "spec.resources.gpus is below spec.parallelism.tensorParallel",
    ),
    (inference_spec(replicas=0), "only serve jobs scale to zero"),
    (
        {**inference_spec(), "restartPolicy": {"backoffSeconds": 50, "maxBackoffSeconds": 5}},
        "maxBackoffSeconds must be >= backoffSeconds",
    ),
    (
        {**inference_spec(), "placement": {"exclusive": True}},
        "spec.placement.exclusive needs spec.placement.topologyKey",
    ),
    ({"mode": "serve", "serve": {}}, "spec.model is required when spec.mode is 'inference' or 'serve'"),
    (inference_spec(stages=0), "spec.parallelism.stages"),
    (
        {**train_spec(), "model": {"path": "/m", "kvCacheDtype": "fp8"}},
        "spec.model.kvCacheDtype only applies to inference and serve",
    ),
]


def test_a_volcano_podgroup_kind_the_cluster_lacks_is_skipped(k8s_cluster: Any, k8s_namespace: str) -> None:
    """No Volcano here: deleting a group (its StatefulSet and PodGroup) and listing the children work."""
    kube = k8s.KubeClient(k8s_cluster.api_client)
    kube.delete_statefulset(k8s_namespace, "llm-r9")  # neither exists: nothing to do, no error
    assert kube.children_exist(k8s_namespace, "llm") is False


def test_admission_refuses_malformed_jobs_with_the_rules_message(
    k8s_cluster: Any, k8s_namespace: str
) -> None:
    for i, (spec, message) in enumerate(REJECTED):
        proc = k8s_cluster.kubectl(
            "apply", "-f", "-", input=manifest(f"bad-{i}", k8s_namespace, spec), check=False
        )
        assert proc.returncode != 0 and message in proc.stderr, (spec, proc.stderr)
    k8s_cluster.kubectl("apply", "-f", "-", input=manifest("good", k8s_namespace, inference_spec()))
    # Layout changes are refused while running and allowed while suspended (before and after).
    changed = manifest("good", k8s_namespace, inference_spec(stages=4))
    proc = k8s_cluster.kubectl("apply", "-f", "-", input=changed, check=False)
    assert proc.returncode != 0 and "spec.parallelism.stages cannot change while the job runs" in proc.stderr
    k8s_cluster.kubectl(
        "apply", "-f", "-", input=manifest("good", k8s_namespace, inference_spec(suspend=True))
    )
    k8s_cluster.kubectl(
        "apply", "-f", "-", input=manifest("good", k8s_namespace, inference_spec(stages=4, suspend=True))
    )
    stored = k8s_cluster.custom.get_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, "good")
    assert stored["spec"]["parallelism"]["stages"] == 4
    assert stored["spec"]["restartPolicy"]["backoffLimit"] == 3  # defaults filled at admission
    # The scale subresource owns spec.parallelism.replicas (an HPA or `kubectl scale` on serve jobs).
    k8s_cluster.kubectl("apply", "-f", "-", input=manifest("chat", k8s_namespace, serve_spec(replicas=1)))
    k8s_cluster.kubectl("scale", f"{PLURAL}/chat", "-n", k8s_namespace, "--replicas=3")
    scaled = k8s_cluster.custom.get_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, "chat")
    assert scaled["spec"]["parallelism"]["replicas"] == 3


@pytest.fixture
def operator(k8s_cluster: Any, k8s_namespace: str, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    log = (tmp_path / "operator.log").open("w")
    env = subprocess_env(**{k: v for k, v in k8s_cluster.env().items() if k in ("KUBECONFIG", "PATH")})
    proc = subprocess.Popen(
        conveyor_cmd(
            "operator", "--standalone", "-n", k8s_namespace, "--metrics-port", "0", "--health-port", "0"
        ),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc
    finally:
        delete_jobs(k8s_cluster, k8s_namespace)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if os.environ.get("CONVEYOR_SHOW_OPERATOR_LOG"):
            print((tmp_path / "operator.log").read_text())


def test_operator_creates_objects_and_restarts_a_failed_group(
    k8s_cluster: Any, k8s_namespace: str, operator: subprocess.Popen[str], tmp_path: Path
) -> None:
    ns, core, custom = k8s_namespace, k8s_cluster.core, k8s_cluster.custom
    script = tmp_path / "sleep.py"
    script.write_text("import time\nwhile True:\n    time.sleep(1)\n")
    spec = train_spec(stages=2, replicas=1, device="cpu", train={"script": str(script)})
    spec["restartPolicy"] = {"backoffLimit": 2, "backoffSeconds": 0}
    k8s_cluster.kubectl("apply", "-f", "-", input=manifest("tr", ns, spec))

    def job() -> dict[str, Any]:
        return dict(custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "tr"))

    eventually(lambda: job().get("status", {}).get("phase"), what="a status on the job")
    eventually(lambda: k8s_cluster.apps.read_namespaced_stateful_set("tr", ns), what="the StatefulSet")
    svc = eventually(lambda: core.read_namespaced_service("tr", ns), what="the headless Service")
    assert svc.spec.cluster_ip == "None" and svc.spec.publish_not_ready_addresses

    def pods() -> list[Any]:
        return [
            p
            for p in core.list_namespaced_pod(ns, label_selector="conveyor.dev/job=tr").items
            if not p.metadata.deletion_timestamp
        ]

    eventually(
        lambda: len(pods()) == 2 and all(p.metadata.labels.get("conveyor.dev/stage") for p in pods()),
        what="2 pods with stage labels",
    )
    first = {p.metadata.name: p.metadata.uid for p in pods()}
    sts = k8s_cluster.apps.read_namespaced_stateful_set("tr", ns)
    assert sts.metadata.owner_references[0].kind == "PipelineJob"

    # A pod fails (evicted): the whole group is replaced, with CONVEYOR_RESTART raised.
    core.patch_namespaced_pod_status(
        "tr-1", ns, {"status": {"phase": "Failed", "reason": "Evicted", "message": "test: node pressure"}}
    )
    eventually(lambda: job()["status"].get("restarts") == 1, what="restarts == 1")
    status = job()["status"]
    assert status["groups"][0]["restarts"] == 1
    eventually(
        lambda: (
            len(pods()) == 2
            and all(p.metadata.uid not in first.values() for p in pods())
            and all(p.metadata.annotations["conveyor.dev/restart"] == "1" for p in pods())
        ),
        what="both pods recreated for restart 1",
    )
    env = {
        e.name: e.value
        for e in k8s_cluster.apps.read_namespaced_stateful_set("tr", ns).spec.template.spec.containers[0].env
    }
    assert env["CONVEYOR_RESTART"] == "1"
    events = eventually(
        lambda: (
            {
                e.reason: e.message
                for e in core.list_namespaced_event(ns).items
                if e.involved_object.name == "tr"
            }
            if "GroupRestarted" in {e.reason for e in core.list_namespaced_event(ns).items}
            else None
        ),
        what="the restart Events",
    )
    # The StatefulSet controller deletes a Failed pod at once: the operator sees the eviction (from the
    # pod's last watch event) or, when a listing beats that event, the pod gone from a running group.
    reason = "PodEvicted" if "PodEvicted" in events else "PodDeleted"
    assert reason in events and "tr-1" in events[reason], events
    assert "restart 1" in events["GroupRestarted"] and reason in events["GroupRestarted"]
    conditions = {c["type"]: c for c in job()["status"]["conditions"]}
    assert conditions["Ready"]["status"] == "False" or job()["status"]["phase"] == "Running"
    assert all(c["observedGeneration"] == 1 for c in conditions.values())
    print(json.dumps(job()["status"], indent=1))


def test_a_statefulset_the_api_server_refuses_fails_the_job_with_its_words(
    k8s_cluster: Any, k8s_namespace: str, operator: subprocess.Popen[str]
) -> None:
    """A toleration's effect the API server does not know passes the CRD (template items are free-form)
    and the model, then every apply of the StatefulSet is refused: the job says so in its status."""
    ns, custom = k8s_namespace, k8s_cluster.custom
    spec = inference_spec(template={"tolerations": [{"key": "gpu", "effect": "Sometimes"}]})
    k8s_cluster.kubectl("apply", "-f", "-", input=manifest("bad", ns, spec))

    def status() -> dict[str, Any]:
        return dict(
            custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "bad").get("status") or {}
        )

    got = eventually(
        lambda: status() if status().get("reason") == "ApplyRefused" else None, what="ApplyRefused"
    )
    assert got["phase"] == "Failed" and "tolerations[0].effect" in got["message"], got
    assert got["message"].startswith("the API server refused StatefulSet bad-r0")


def test_two_operator_replicas_never_act_at_once(
    k8s_cluster: Any, k8s_namespace: str, tmp_path: Path
) -> None:
    """Leader election through kopf peering: the higher priority acts, the other pauses."""
    env = subprocess_env(**{k: v for k, v in k8s_cluster.env().items() if k in ("KUBECONFIG", "PATH")})
    logs = {name: tmp_path / f"{name}.log" for name in ("leader", "standby")}
    procs = []
    try:
        for name, priority in (("leader", "20"), ("standby", "10")):
            cmd = conveyor_cmd(
                "operator",
                "-n",
                k8s_namespace,
                "--peering",
                "conveyor-test",
                "--priority",
                priority,
                "--metrics-port",
                "0",
                "--health-port",
                "0",
                "--verbose",
            )
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=logs[name].open("w"), stderr=subprocess.STDOUT)
            )
            time.sleep(3 if name == "leader" else 0)
        # kopf starts the standby's watch streams paused and never resumes them while the leader lives.
        paused = "Pausing the watch-stream for pipelinejobs"
        eventually(lambda: paused in logs["standby"].read_text(), what="the standby to pause")
        k8s_cluster.kubectl(
            "apply", "-f", "-", input=manifest("one", k8s_namespace, inference_spec(replicas=1))
        )
        eventually(
            lambda: (
                '"job": "one"' in logs["leader"].read_text()
                and '"reason": "Pending"' in logs["leader"].read_text()
            ),
            what="the leader to reconcile",
        )
        time.sleep(2)
        standby = logs["standby"].read_text()
        assert '"logger": "conveyor_operator.handlers"' not in standby  # it never reconciled
        assert "Resuming the watch-stream for pipelinejobs" not in standby
    finally:
        delete_jobs(k8s_cluster, k8s_namespace)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
