"""What a pod says about its rank, read from the pod object (pure).

The worker contract (docs/operator.md): a worker exits 0 when the job's work is done, after writing
``{"completed": true, "lastCheckpoint": {...}}`` to its termination log; a failure exits non-zero. A
StatefulSet's pods restart after any exit, so the evidence is in the container's ``state.terminated``
or, after the kubelet restarted it, ``lastState.terminated``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from conveyor_operator.render import (
    GROUP_LABEL,
    POD_INDEX_LABEL,
    RESTART_ANNOTATION,
    TEMPLATE_HASH_ANNOTATION,
    WORKER_CONTAINER,
)


@dataclass(frozen=True)
class PodFailure:
    reason: str  # PodFailed, PodEvicted, ContainerRestarted
    message: str


@dataclass(frozen=True)
class PodObservation:
    name: str
    uid: str
    group: str
    index: int
    restart: int  # the CONVEYOR_RESTART it was created with
    template_hash: str
    created: datetime | None
    deleting: bool
    scheduled: bool
    ready: bool
    completed: bool
    failure: PodFailure | None
    last_checkpoint: dict[str, Any] | None
    labels: dict[str, str]


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _message(terminated: dict[str, Any]) -> dict[str, Any]:
    try:
        parsed = json.loads(terminated.get("message") or "{}")
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _worker_status(pod: dict[str, Any]) -> dict[str, Any]:
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        if cs.get("name") == WORKER_CONTAINER:
            return dict(cs)
    return {}


def observe_pod(pod: dict[str, Any]) -> PodObservation:
    meta = pod.get("metadata", {})
    labels = dict(meta.get("labels") or {})
    annotations = meta.get("annotations") or {}
    status = pod.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    cs = _worker_status(pod)
    terminations = [
        t
        for t in ((cs.get("state") or {}).get("terminated"), (cs.get("lastState") or {}).get("terminated"))
        if t
    ]

    completed = False
    failure: PodFailure | None = None
    last_checkpoint: dict[str, Any] | None = None
    for term in terminations:
        msg = _message(term)
        if isinstance(msg.get("lastCheckpoint"), dict) and last_checkpoint is None:
            last_checkpoint = msg["lastCheckpoint"]
        if term.get("exitCode") == 0 and msg.get("completed") is True:
            completed = True
        elif term.get("exitCode") != 0 and failure is None:
            failure = PodFailure(
                "ContainerRestarted" if cs.get("restartCount", 0) else "PodFailed",
                f"pod {meta.get('name')}: container {WORKER_CONTAINER} exited {term.get('exitCode')}"
                + (f" ({term['reason']})" if term.get("reason") else ""),
            )
    if status.get("phase") == "Failed":
        reason = "PodEvicted" if status.get("reason") == "Evicted" else "PodFailed"
        failure = PodFailure(
            reason,
            f"pod {meta.get('name')} is Failed: {status.get('message') or status.get('reason') or 'no reason given'}",
        )
    if status.get("phase") == "Succeeded":
        completed = True

    index_raw = labels.get(POD_INDEX_LABEL) or meta.get("name", "-0").rsplit("-", 1)[-1]
    return PodObservation(
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        group=labels.get(GROUP_LABEL, ""),
        index=int(index_raw) if str(index_raw).isdigit() else 0,
        restart=int(annotations.get(RESTART_ANNOTATION, "0") or 0),
        template_hash=annotations.get(TEMPLATE_HASH_ANNOTATION, ""),
        created=parse_time(meta.get("creationTimestamp")),
        deleting=bool(meta.get("deletionTimestamp")),
        scheduled=conditions.get("PodScheduled") == "True" or bool(pod.get("spec", {}).get("nodeName")),
        ready=conditions.get("Ready") == "True",
        completed=completed and failure is None,
        failure=failure,
        last_checkpoint=last_checkpoint,
        labels=labels,
    )
