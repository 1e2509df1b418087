"""spec.placement as the real kube-scheduler reads it: Nodes labelled with two racks, a job of three
groups (2 pods each) with `topologyKey` + `exclusive`. Two groups land each in one rack, never sharing it;
the third fits nowhere, and the operator's plan reports it as Unschedulable with the scheduler's message.

The kube-scheduler runs here under a profile of its own (`SCHEDULER`), so the agent, the default
scheduler's stand-in, leaves these pods to it; the Nodes have no kubelet, so the pods are bound, never run.
"""

from __future__ import annotations

import subprocess
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conveyor.spec import parse_spec
from conveyor_operator import render
from conveyor_operator.observe import observe_pod
from conveyor_operator.plan import JobView
from conveyor_operator.reconcile import plan_reconcile
from kubernetes import client

from tests.cluster import binaries
from tests.cluster.controlplane import free_port
from tests.cluster.waiting import wait_for
from tests.operator.builders import inference_spec, job_body

pytestmark = [pytest.mark.cluster, pytest.mark.integration]

SCHEDULER = "conveyor-placement-test"
RACK = "example.com/rack"
NODES = {"a1": "rack-a", "a2": "rack-a", "b1": "rack-b", "b2": "rack-b"}


@pytest.fixture
def kube_scheduler(k8s_cluster: Any, tmp_path: Any) -> Iterator[None]:
    config = tmp_path / "scheduler.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            apiVersion: kubescheduler.config.k8s.io/v1
            kind: KubeSchedulerConfiguration
            leaderElection: {{leaderElect: false}}
            clientConnection: {{kubeconfig: {k8s_cluster.kubeconfig}}}
            profiles:
              - schedulerName: {SCHEDULER}
            """
        )
    )
    log = (tmp_path / "kube-scheduler.log").open("w")
    argv = [
        str(binaries.binary("kube-scheduler")),
        f"--config={config}",
        "--bind-address=127.0.0.1",
        f"--secure-port={free_port()}",
        f"--authentication-kubeconfig={k8s_cluster.kubeconfig}",
        f"--authorization-kubeconfig={k8s_cluster.kubeconfig}",
    ]
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()


@pytest.fixture
def rack_nodes(k8s_cluster: Any, k8s_namespace: str) -> Iterator[dict[str, str]]:
    """Nodes without a kubelet, Ready, labelled with their rack; name -> rack."""
    core = k8s_cluster.core
    made = {}
    for short, rack in NODES.items():
        name = f"{k8s_namespace}-{short}"[:63]
        labels = {RACK: rack, "conveyor.dev/test-node": k8s_namespace, "kubernetes.io/hostname": name}
        core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name, labels=labels)))
        capacity = {"cpu": "8", "memory": "16Gi", "pods": "110"}
        status = {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test"}],
        }
        core.patch_node_status(name, {"status": status})
        # Admission marks a new Node not-ready (a taint); the node lifecycle controller that would lift it
        # once Ready does not run here.
        core.patch_node(name, {"spec": {"taints": None}})
        made[name] = rack
    try:
        yield made
    finally:
        for name in made:
            core.delete_node(name)


def _pods(k8s_cluster: Any, namespace: str) -> list[dict[str, Any]]:
    listed = k8s_cluster.core.list_namespaced_pod(namespace, label_selector=f"{render.JOB_LABEL}=llm")
    return [k8s_cluster.core.api_client.sanitize_for_serialization(p) for p in listed.items]


def _decided(pod: dict[str, Any]) -> bool:
    if pod.get("spec", {}).get("nodeName"):
        return True
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conditions)


def test_groups_are_kept_in_one_rack_each_and_the_one_that_fits_nowhere_is_unschedulable(
    k8s_cluster: Any, k8s_namespace: str, kube_scheduler: None, rack_nodes: dict[str, str]
) -> None:
    doc = inference_spec(
        stages=2,
        replicas=3,
        device="cpu",
        model={"path": "/models/tiny"},  # no PersistentVolumeClaims: nothing but placement decides
        checkpoint=None,
        template={
            "schedulerName": SCHEDULER,
            "nodeSelector": {"conveyor.dev/test-node": k8s_namespace},
            # the output on a volume that outlives the pods (else InvalidSpec), one the scheduler ignores
            "volumes": [{"name": "results", "hostPath": {"path": "/srv/results"}}],
            "volumeMounts": [{"name": "results", "mountPath": "/ckpt"}],
        },
        placement={"topologyKey": RACK, "exclusive": True, "unschedulableTimeoutSeconds": 10},
    )
    job = render.JobRef(name="llm", namespace=k8s_namespace, uid="not-a-real-owner")
    objects = render.build_all(job, parse_spec(doc), {}, running=True)
    apps = k8s_cluster.apps
    try:
        for obj in objects:
            obj["metadata"].pop(
                "ownerReferences"
            )  # no PipelineJob here: the garbage collector would take them
            if obj["kind"] == "StatefulSet":
                apps.create_namespaced_stateful_set(k8s_namespace, obj)
            elif obj["kind"] == "Service":
                k8s_cluster.core.create_namespaced_service(k8s_namespace, obj)

        pods = wait_for(
            lambda: (p := _pods(k8s_cluster, k8s_namespace)) and len(p) == 6 and all(map(_decided, p)) and p,
            "the kube-scheduler to bind or refuse all 6 pods",
            timeout=90,
        )
        racks: dict[str, set[str | None]] = {}
        for pod in pods:
            group = pod["metadata"]["labels"][render.GROUP_LABEL]
            racks.setdefault(group, set()).add(rack_nodes.get(pod["spec"].get("nodeName") or ""))
        placed = {g: r for g, r in racks.items() if None not in r}
        stuck = [g for g, r in racks.items() if r == {None}]
        said = {p["metadata"]["name"]: observe_pod(p).unschedulable for p in pods}
        assert len(placed) == 2 and len(stuck) == 1, (racks, said)  # whole groups: none half-placed
        assert all(len(r) == 1 for r in placed.values()), racks  # each group within one rack
        first, second = placed.values()
        assert first != second, racks  # exclusive: one group per rack

        body = job_body(doc, namespace=k8s_namespace)
        observed = [observe_pod(p) for p in pods]
        plan = plan_reconcile(JobView.from_body(body), observed, datetime.now(UTC) + timedelta(seconds=11))
        condition = next(c for c in plan.status.conditions if c.type == "Unschedulable")
        assert condition.status == "True"
        assert f"group {stuck[0]}: 2 of 2 pods unschedulable" in condition.message
        assert "affinity" in condition.message  # the kube-scheduler's own words
    finally:
        # Pods bound to Nodes without a kubelet never confirm a graceful deletion: remove them at once.
        for sts in apps.list_namespaced_stateful_set(k8s_namespace).items:
            apps.delete_namespaced_stateful_set(sts.metadata.name, k8s_namespace, propagation_policy="Orphan")
        for pod in k8s_cluster.core.list_namespaced_pod(k8s_namespace).items:
            k8s_cluster.core.delete_namespaced_pod(pod.metadata.name, k8s_namespace, grace_period_seconds=0)
