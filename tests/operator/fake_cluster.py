"""An in-memory stand-in for the API server behind ``k8s.Client``, with a tiny StatefulSet controller:
enough to drive the handlers through create -> pods -> failure -> restart without a cluster."""

from __future__ import annotations

import copy
from typing import Any

from conveyor_operator import render

from tests.operator.builders import stamp


class FakeCluster:
    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (kind, namespace, name)
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[tuple[str, str, str]] = []
        self.status_writes = 0
        self.deleted_pods: list[str] = []
        self.forced_pods: list[str] = []  # deleted without waiting for the kubelet
        self.clock = 0.0

    # ---- k8s.Client ----
    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        job = self.jobs.get((namespace, name))
        return copy.deepcopy(job) if job else None

    def list_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(p)
            for (ns, _), p in sorted(self.pods.items())
            if ns == namespace and p["metadata"]["labels"].get(render.JOB_LABEL) == job
        ]

    def apply(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self.objects[(obj["kind"], meta["namespace"], meta["name"])] = copy.deepcopy(obj)
        if obj["kind"] == "StatefulSet":
            self._sync_statefulset(obj)

    def delete_pod(self, namespace: str, name: str, uid: str | None = None, force: bool = False) -> None:
        if force:
            self.forced_pods.append(name)
        current = self.pods.get((namespace, name))
        if current is not None and uid and current["metadata"].get("uid") != uid:
            return  # the precondition fails (409): that incarnation is gone already
        pod = self.pods.pop((namespace, name), None)
        if pod is not None:
            self.deleted_pods.append(name)
            sts = self.objects.get(("StatefulSet", namespace, pod["metadata"]["labels"][render.GROUP_LABEL]))
            if sts is not None:
                self._sync_statefulset(sts)

    def label_pod(self, namespace: str, name: str, labels: dict[str, str]) -> None:
        self.pods[(namespace, name)]["metadata"]["labels"].update(labels)

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.status_writes += 1
        self.jobs[(namespace, name)]["status"] = {k: v for k, v in status.items() if v is not None}

    def event(self, job: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    def children_exist(self, namespace: str, job: str) -> bool:
        return any(
            ns == namespace and o["metadata"]["labels"].get(render.JOB_LABEL) == job
            for (_, ns, _), o in self.objects.items()
        )

    def delete_children(self, namespace: str, job: str) -> None:
        for key in [
            k
            for k, o in self.objects.items()
            if k[1] == namespace and o["metadata"]["labels"].get(render.JOB_LABEL) == job
        ]:
            del self.objects[key]
        for key in [
            k
            for k, p in self.pods.items()
            if k[0] == namespace and p["metadata"]["labels"].get(render.JOB_LABEL) == job
        ]:
            del self.pods[key]

    def delete_statefulset(self, namespace: str, name: str) -> None:
        self.objects.pop(("StatefulSet", namespace, name), None)
        for key in [
            k
            for k, p in self.pods.items()
            if k[0] == namespace and p["metadata"]["labels"].get(render.GROUP_LABEL) == name
        ]:
            del self.pods[key]

    # ---- what the StatefulSet controller and kubelet would do ----
    def _sync_statefulset(self, sts: dict[str, Any]) -> None:
        """OnDelete: create missing ordinals from the current template; delete ordinals beyond replicas."""
        ns, name = sts["metadata"]["namespace"], sts["metadata"]["name"]
        template = sts["spec"]["template"]
        for index in range(sts["spec"]["replicas"]):
            if (ns, f"{name}-{index}") in self.pods:
                continue
            self.pods[(ns, f"{name}-{index}")] = {
                "metadata": {
                    "name": f"{name}-{index}",
                    "namespace": ns,
                    "labels": {**template["metadata"]["labels"], render.POD_INDEX_LABEL: str(index)},
                    "annotations": dict(template["metadata"]["annotations"]),
                    "creationTimestamp": stamp(self.clock),
                },
                "spec": {"nodeName": "node-1"},
                "status": {
                    "phase": "Running",
                    "conditions": [
                        {"type": "PodScheduled", "status": "True"},
                        {"type": "Ready", "status": "False"},
                    ],
                    "containerStatuses": [{"name": "worker", "restartCount": 0, "state": {"running": {}}}],
                },
            }
        for pns, pname in list(self.pods):
            if (
                pns == ns
                and pname.rsplit("-", 1)[0] == name
                and int(pname.rsplit("-", 1)[1]) >= sts["spec"]["replicas"]
            ):
                del self.pods[(pns, pname)]

    def set_ready(self, namespace: str, prefix: str = "") -> None:
        for (ns, name), pod in self.pods.items():
            if ns == namespace and name.startswith(prefix):
                pod["status"]["conditions"][1]["status"] = "True"

    def pod(self, namespace: str, name: str) -> dict[str, Any]:
        return self.pods[(namespace, name)]
