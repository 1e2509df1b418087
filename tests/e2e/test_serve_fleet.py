"""A serve fleet through the local cluster: 2 replicas (2 stages each) of a tiny random Llama on the CPU
under a steady request loop, while its spec changes (a rolling update) and one worker pod is deleted: no
request fails, and the serve Service never selects a replica that is not whole and ready.

There is no kube-proxy here: the test is the Service's proxy. A watcher reads the Service's EndpointSlices
(ready endpoints only) and the pods every WATCH_PERIOD and records any endpoint whose replica has a pod
missing or not Ready; the request loop sends each request to the next ready endpoint, from the pod
network's hub namespace (tests/cluster/probe.py)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conveyor.spec import GROUP, PLURAL, VERSION
from kubernetes import client

from tests.cluster import probe
from tests.cluster.waiting import wait_for
from tests.conftest import conveyor_cmd, subprocess_env
from tests.e2e.test_train_job import job_status

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
NAME, PORT, STAGES = "fleet", 8000, 2
WATCH_PERIOD = 0.25


def serve_job(model: Path) -> dict:
    return {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "PipelineJob",
        "metadata": {"name": NAME},
        "spec": {
            "mode": "serve",
            "device": "cpu",
            "model": {"path": str(model), "dtype": "float32"},
            "parallelism": {"stages": STAGES, "tensorParallel": 1, "replicas": 2},
            "resources": {"gpus": 0, "requests": {"cpu": "100m", "memory": "512Mi"}},
            "serve": {
                "port": PORT,
                "maxBatchSize": 4,
                "rollout": {"maxSurge": 1, "maxUnavailable": 0, "drainSeconds": 3},
            },
            "restartPolicy": {"backoffLimit": 3, "backoffSeconds": 0, "startupTimeoutSeconds": 300},
        },
    }


def hub_namespace(cluster) -> str:
    record = Path(cluster.dir) / "agent" / "netns.txt"
    hubs = [n for n in record.read_text().split() if n.endswith("-hub")] if record.exists() else []
    if not hubs:
        pytest.skip(
            "the agent runs pods on the host's loopback (no root): Services cannot be reached per pod"
        )
    return hubs[-1]


@dataclass
class Fleet:
    """The Service as the test sees it, the request loop's results, and what the watcher found."""

    cluster: object
    namespace: str
    hub: str
    endpoints: list[str] = field(default_factory=list)  # ready endpoint addresses, newest view
    pod_of: dict[str, str] = field(default_factory=dict)  # address -> pod, for the failure messages
    serving_groups: list[set[str]] = field(default_factory=list)  # per watch: groups the Service selects
    violations: list[str] = field(default_factory=list)
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def watch_once(self) -> None:
        core = self.cluster.core  # type: ignore[attr-defined]
        slices = client.DiscoveryV1Api(self.cluster.api_client).list_namespaced_endpoint_slice(  # type: ignore[attr-defined]
            self.namespace, label_selector=f"kubernetes.io/service-name={NAME}-serve"
        )
        ready = [
            e
            for s in slices.items
            for e in s.endpoints or []
            if e.conditions is not None and e.conditions.ready and e.target_ref is not None
        ]
        pods = {p.metadata.name: p for p in core.list_namespaced_pod(self.namespace).items}
        groups = set()
        for endpoint in ready:
            pod = pods.get(endpoint.target_ref.name)
            group = pod.metadata.labels.get("conveyor.dev/group") if pod is not None else None
            groups.add(group or endpoint.target_ref.name)
            members = [pods.get(f"{group}-{i}") for i in range(STAGES)] if group else []
            whole = members and all(
                m is not None
                and any(c.type == "Ready" and c.status == "True" for c in (m.status.conditions or []))
                for m in members
            )
            if not whole:
                self.violations.append(
                    f"{time.strftime('%X')} {endpoint.target_ref.name}: replica {group} not ready"
                )
        self.serving_groups.append(groups)
        self.endpoints = [a for e in ready for a in e.addresses]
        self.pod_of.update({a: e.target_ref.name for e in ready for a in e.addresses})

    def watch(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(client.ApiException):  # an API hiccup: look again next period
                self.watch_once()
            self.stop.wait(WATCH_PERIOD)

    def requests(self) -> None:
        turn = 0
        while not self.stop.is_set():
            targets = list(self.endpoints)
            if not targets:
                self.failures.append(f"{time.strftime('%X')} no ready endpoint")
                time.sleep(0.2)
                continue
            address = targets[turn % len(targets)]
            turn += 1
            sent = time.strftime("%X")
            body = json.dumps({"model": NAME, "prompt": "hello fleet", "max_tokens": 6, "temperature": 0})
            try:
                status, reply = probe.request(
                    self.hub,
                    address,
                    PORT,
                    "POST",
                    "/v1/completions",
                    body=body.encode(),
                    headers={"Content-Type": "application/json"},
                    timeout=60.0,
                )
            except OSError as err:
                self.failures.append(f"{sent}-{time.strftime('%X')} {self.pod_of.get(address)}: {err!r}")
                continue
            if status == 200 and json.loads(reply)["choices"][0]["text"] is not None:
                self.ok += 1
            else:
                self.failures.append(
                    f"{sent}-{time.strftime('%X')} {self.pod_of.get(address)}: {status} {reply[:200]!r}"
                )


def fleet_status(cluster, namespace: str) -> dict:
    return job_status(cluster, namespace, NAME)


def settled(cluster, namespace: str, hash_: str | None = None):
    """Two replicas serving, no rollout or drain under way (and every pod on template ``hash_``)."""
    status = fleet_status(cluster, namespace)
    fleet = status.get("fleet") or {}
    if fleet.get("servingReplicas") != 2 or fleet.get("strategy") or fleet.get("draining"):
        return None
    pods = cluster.core.list_namespaced_pod(namespace, label_selector=f"conveyor.dev/job={NAME}").items
    if len(pods) != 2 * STAGES:
        return None
    if hash_ is not None and {p.metadata.annotations["conveyor.dev/template-hash"] for p in pods} != {hash_}:
        return None
    return status


def test_a_serving_fleet_rolls_and_loses_a_worker_without_failing_a_request(
    k8s_cluster, k8s_namespace, operator, tmp_path
):
    hub = hub_namespace(k8s_cluster)
    model = tmp_path / "tiny-llama"
    subprocess.run(
        conveyor_cmd()[:1] + [str(ROOT / "deploy" / "examples" / "make-tiny-llama.py"), str(model)],
        env=subprocess_env(),
        check=True,
    )
    manifest = tmp_path / "serve.yaml"
    manifest.write_text(yaml.safe_dump(serve_job(model)))
    k8s_cluster.kubectl("apply", "-n", k8s_namespace, "-f", str(manifest))

    def diagnose() -> str:
        pods = k8s_cluster.kubectl("get", "pods", "-n", k8s_namespace, "-o", "wide", check=False).stdout
        return (
            f"status: {json.dumps(fleet_status(k8s_cluster, k8s_namespace), indent=1)}\npods:\n{pods}\n"
            + (f"operator log tail:\n{operator.log.read_text()[-3000:]}")
        )

    try:
        first = wait_for(
            lambda: settled(k8s_cluster, k8s_namespace), "2 replicas serving", timeout=240, interval=1
        )
    except AssertionError as err:
        raise AssertionError(f"{err}\n{diagnose()}") from None
    fleet = Fleet(k8s_cluster, k8s_namespace, hub)
    wait_for(lambda: fleet.watch_once() or len(fleet.endpoints) == 2, "2 ready endpoints", timeout=30)
    fleet.serving_groups.clear()
    threads = [threading.Thread(target=fleet.watch), threading.Thread(target=fleet.requests)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: fleet.ok >= 5, "requests answered before the rollout", timeout=60)

        # A rolling update: a new pod template (an env var), replica by replica behind the Service.
        patch = {"spec": {"template": {"env": [{"name": "FLEET_REVISION", "value": "2"}]}}}
        k8s_cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, NAME, patch)
        wait_for(
            lambda: (fleet_status(k8s_cluster, k8s_namespace).get("fleet") or {}).get("strategy"),
            "the rollout to start",
            timeout=30,
        )
        strategy = fleet_status(k8s_cluster, k8s_namespace)["fleet"]["strategy"]
        new_hash = wait_for(
            lambda: (
                fleet_status(k8s_cluster, k8s_namespace).get("resolved", {}).get("templateHash")
                != first["resolved"]["templateHash"]
                and fleet_status(k8s_cluster, k8s_namespace)["resolved"]["templateHash"]
            ),
            "the new template hash",
            timeout=30,
        )
        wait_for(
            lambda: settled(k8s_cluster, k8s_namespace, new_hash),
            "the rollout to finish",
            timeout=300,
            interval=1,
        )
        during_rollout = fleet.ok

        # A worker lost: the stage-1 pod of replica 0 is deleted (as a node drain or eviction would); its
        # replica leaves the Service, restarts and comes back, the other serves meanwhile.
        k8s_cluster.core.delete_namespaced_pod(f"{NAME}-r0-1", k8s_namespace)
        wait_for(
            lambda: fleet_status(k8s_cluster, k8s_namespace).get("restarts", 0) >= 1,
            "the replica's restart",
            timeout=60,
        )
        wait_for(
            lambda: settled(k8s_cluster, k8s_namespace),
            "the replica back in the Service",
            timeout=300,
            interval=1,
        )
        ok_before_end = fleet.ok
        wait_for(lambda: fleet.ok >= ok_before_end + 5, "requests after the restart", timeout=60)
    except AssertionError as err:
        raise AssertionError(f"{err}\nfailures: {fleet.failures[:10]}\n{diagnose()}") from None
    finally:
        fleet.stop.set()
        for t in threads:
            t.join(90)

    print(
        f"serve fleet: {fleet.ok} requests answered ({during_rollout} by the rollout's end), "
        f"{len(fleet.failures)} failed, {len(fleet.serving_groups)} endpoint checks "
        f"({len(fleet.violations)} found a replica not ready), rollout {strategy}"
    )
    assert strategy == "Surge"
    assert fleet.failures == [], fleet.failures[:10]
    assert fleet.violations == [], fleet.violations[:10]
    # The Service went through the surge replica and both new generations (r0 and r1 replaced twice over).
    assert any(f"{NAME}-r2" in groups for groups in fleet.serving_groups)
    assert min(len(g) for g in fleet.serving_groups) >= 1
