"""Fluent builders for PipelineJob bodies and the pods a StatefulSet would create (operator tests)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from conveyor.spec import parse_spec
from conveyor_operator import render

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def stamp(seconds: float) -> str:
    return at(seconds).strftime("%Y-%m-%dT%H:%M:%SZ")


def inference_spec(stages: int = 2, tp: int = 1, replicas: int = 1, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "mode": "inference",
        "model": {"path": "/models/tiny", "volume": "models"},
        "parallelism": {"stages": stages, "tensorParallel": tp, "replicas": replicas},
        "checkpoint": {"volume": "ckpt", "path": "/ckpt"},
        "inference": {"input": "/data/prompts.jsonl", "output": "/ckpt/out.jsonl"},
        "restartPolicy": {"backoffLimit": 3, "backoffSeconds": 10, "maxBackoffSeconds": 60},
    }
    spec.update(extra)
    return spec


def train_spec(stages: int = 2, tp: int = 1, replicas: int = 2, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "mode": "train",
        "parallelism": {"stages": stages, "tensorParallel": tp, "replicas": replicas},
        "checkpoint": {"volume": "ckpt", "path": "/ckpt", "every": 10},
        "train": {"script": "/app/train.py", "args": ["--lr", "0.1"], "steps": 100},
        "restartPolicy": {"backoffLimit": 2, "backoffSeconds": 0, "maxBackoffSeconds": 0},
    }
    spec.update(extra)
    return spec


def serve_spec(stages: int = 2, tp: int = 2, replicas: int = 2, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "mode": "serve",
        "model": {"path": "/models/llama", "volume": "models"},
        "parallelism": {"stages": stages, "tensorParallel": tp, "replicas": replicas},
        "serve": {"port": 8000},
        "restartPolicy": {"backoffLimit": 5, "backoffSeconds": 0, "maxBackoffSeconds": 0},
    }
    spec.update(extra)
    return spec


def job_body(
    spec: dict[str, Any],
    *,
    name: str = "llm",
    namespace: str = "ml",
    status: dict[str, Any] | None = None,
    generation: int = 1,
) -> dict[str, Any]:
    return {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "PipelineJob",
        "metadata": {"name": name, "namespace": namespace, "uid": "uid-1234", "generation": generation},
        "spec": copy.deepcopy(spec),
        "status": copy.deepcopy(status or {}),
    }


def group_pods(
    body: dict[str, Any],
    group_index: int = 0,
    *,
    restart: int = 0,
    ready: bool = True,
    created: float = 0,
    spec_override: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The pods the StatefulSet of one group would have (labels and annotations as render.py sets them)."""
    name = body["metadata"]["name"]
    spec = parse_spec(spec_override or body["spec"])
    group = render.groups(name, spec)[group_index]
    sts = render.build_statefulset(
        render.JobRef(name, body["metadata"]["namespace"], "uid"), spec, group, restart=restart, running=True
    )
    template = sts["spec"]["template"]
    pods = []
    for index in range(group.pods):
        labels = {**template["metadata"]["labels"], render.POD_INDEX_LABEL: str(index)}
        pods.append(
            {
                "metadata": {
                    "name": f"{group.name}-{index}",
                    "namespace": body["metadata"]["namespace"],
                    "labels": labels,
                    "annotations": dict(template["metadata"]["annotations"]),
                    "creationTimestamp": stamp(created),
                },
                "spec": {"nodeName": "node-1"},
                "status": {
                    "phase": "Running",
                    "conditions": [
                        {"type": "PodScheduled", "status": "True"},
                        {"type": "Ready", "status": "True" if ready else "False"},
                    ],
                    "containerStatuses": [
                        {"name": "worker", "ready": ready, "restartCount": 0, "state": {"running": {}}}
                    ],
                },
            }
        )
    return pods


def fail(
    pod: dict[str, Any], exit_code: int = 1, *, restarted: bool = True, message: str = ""
) -> dict[str, Any]:
    """The worker container crashed; with ``restarted`` the kubelet already restarted it (lastState)."""
    cs = pod["status"]["containerStatuses"][0]
    terminated = {"exitCode": exit_code, "reason": "Error", "message": message}
    if restarted:
        cs.update(restartCount=1, lastState={"terminated": terminated}, state={"running": {}})
    else:
        cs.update(state={"terminated": terminated})
    pod["status"]["conditions"][1]["status"] = "False"
    return pod


def evict(pod: dict[str, Any]) -> dict[str, Any]:
    pod["status"].update(phase="Failed", reason="Evicted", message="The node was low on resource: memory.")
    return pod


def complete(pod: dict[str, Any], step: int | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"completed": True}
    if step is not None:
        msg["lastCheckpoint"] = {"step": step, "time": stamp(0)}
    cs = pod["status"]["containerStatuses"][0]
    cs.update(
        restartCount=1,
        lastState={"terminated": {"exitCode": 0, "message": json.dumps(msg)}},
        state={"running": {}},
    )
    pod["status"]["conditions"][1]["status"] = "False"
    return pod


def checkpoint(pod: dict[str, Any], step: int) -> dict[str, Any]:
    """A running pod that earlier published a checkpoint (a crash report that was already handled)."""
    cs = pod["status"]["containerStatuses"][0]
    msg = json.dumps({"lastCheckpoint": {"step": step, "time": stamp(0)}})
    cs["state"] = {"terminated": {"exitCode": 1, "message": msg}}
    return pod
