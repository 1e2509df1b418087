"""What a pod says about its rank, read from the pod object (pure).

The worker contract (docs/operator.md): a worker exits 0 when the job's work is done, after writing
``{"completed": true, "lastCheckpoint": {...}}`` to its termination log; a failure exits non-zero. A
StatefulSet's pods restart after any exit, so the evidence is in the container's ``state.terminated``
or, after the kubelet restarted it, ``lastState.terminated``. Exits are numbered per pod (``restartCount``
counts the earlier ones) so that ``restarts.py`` can account each exit once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
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
class Termination:
    """One exit of the worker container, as the kubelet still shows it (``state`` or ``lastState``)."""

    index: int  # 1-based: the container's index-th exit in this pod (restartCount counts the earlier ones)
    exit_code: int
    reason: str
    finished_at: str | None
    completed: bool  # exit 0 after reporting {"completed": true}
    stopped: bool = False  # ended by the pod's deletion (SIGTERM on delete), not by the worker
    restarted: bool = True  # the kubelet restarted the container after it (lastState), or not yet (state)
    last_checkpoint: dict[str, Any] | None = None  # its message's lastCheckpoint: kept in merge_witness
    cause: str | None = None  # the worker's one-line cause (failure.py) from its termination message

    @property
    def failed(self) -> bool:
        return self.exit_code != 0 and not self.stopped

    def describe(self, pod: str) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return f"pod {pod}: container {WORKER_CONTAINER} exited {self.exit_code}{why}"


@dataclass(frozen=True)
class PodObservation:
    name: str
    uid: str
    group: str
    index: int
    restart: int  # the CONVEYOR_RESTART it was created with
    template_hash: str
    created: datetime | None
    deletion_deadline: datetime | None  # deletionTimestamp: the kubelet should be done by then
    scheduled: bool
    ready: bool
    completed: bool
    failure: PodFailure | None
    last_checkpoint: dict[str, Any] | None
    labels: dict[str, str]
    phase_failure: PodFailure | None = None  # the pod itself is Failed or evicted
    terminations: tuple[Termination, ...] = ()  # the (at most two) exits still visible, oldest first
    exits: int = 0  # exits of the worker container so far: restartCount, + 1 while it is terminated
    listed: bool = True  # False: seen only in a watch event (the pod may be gone already)
    conditions: frozenset[str] = frozenset()  # pod condition types that are True (DisruptionTarget, ...)
    # PodScheduled=False with reason Unschedulable: the scheduler's message and since when it says so.
    unschedulable: str | None = None
    unschedulable_since: datetime | None = None
    ip: str | None = None  # status.podIP: where its metrics are (scrape.py)

    @property
    def deleting(self) -> bool:
        return self.deletion_deadline is not None


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


def _deletion_requested(meta: dict[str, Any], deadline: datetime | None) -> datetime | None:
    """When the pod's deletion was asked for: its deadline (deletionTimestamp) less the grace period."""
    if deadline is None:
        return None
    return deadline - timedelta(seconds=int(meta.get("deletionGracePeriodSeconds") or 0))


def _terminations(cs: dict[str, Any], deletion: datetime | None) -> list[Termination]:
    """The visible exits, numbered: ``lastState`` holds exit number restartCount; ``state.terminated`` (the
    container is down now and not yet restarted) holds the one after it."""
    restarts = int(cs.get("restartCount") or 0)
    found = []
    for index, term in (
        (restarts, (cs.get("lastState") or {}).get("terminated")),
        (restarts + 1, (cs.get("state") or {}).get("terminated")),
    ):
        if not term or index < 1:
            continue
        msg = _message(term)
        code = int(term.get("exitCode") or 0)
        finished = parse_time(term.get("finishedAt"))
        # A container stopped because its pod is being deleted did not fail: whoever deleted the pod
        # (the operator's restart, a rolling update, a person) is accounted for elsewhere.
        stopped = deletion is not None and finished is not None and finished >= deletion
        found.append(
            Termination(
                index=index,
                exit_code=code,
                reason=str(term.get("reason") or ""),
                finished_at=term.get("finishedAt"),
                completed=code == 0 and msg.get("completed") is True,
                stopped=stopped,
                restarted=index <= restarts,
                last_checkpoint=msg["lastCheckpoint"]
                if isinstance(msg.get("lastCheckpoint"), dict)
                else None,
                cause=str(msg.get("cause") or msg.get("message") or "") or None,
            )
        )
    return found


def observe_pod(pod: dict[str, Any]) -> PodObservation:
    meta = pod.get("metadata", {})
    name = meta.get("name", "")
    labels = dict(meta.get("labels") or {})
    annotations = meta.get("annotations") or {}
    status = pod.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    scheduling: dict[str, Any] = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), {}
    )
    refused = scheduling.get("status") == "False" and scheduling.get("reason") == "Unschedulable"
    cs = _worker_status(pod)
    deadline = parse_time(meta.get("deletionTimestamp"))
    deletion = _deletion_requested(meta, deadline)
    terminations = _terminations(cs, deletion)

    last_checkpoint: dict[str, Any] | None = None
    for raw in ((cs.get("state") or {}).get("terminated"), (cs.get("lastState") or {}).get("terminated")):
        msg = _message(raw or {})
        if isinstance(msg.get("lastCheckpoint"), dict):
            last_checkpoint = msg["lastCheckpoint"]
            break
    failed = [t for t in terminations if t.failed]
    failure = None
    if failed:
        newest = failed[-1]
        reason = "ContainerRestarted" if cs.get("restartCount") else "PodFailed"
        failure = PodFailure(reason, newest.describe(name))
    phase_failure: PodFailure | None = None
    if status.get("phase") == "Failed":
        evicted = status.get("reason") == "Evicted"
        # A pod whose containers were stopped by its deletion ends Failed too (the kubelet marks deleted
        # pods terminal); only an eviction or a failure before the deletion counts.
        if evicted or deletion is None or failed or not terminations:
            phase_failure = PodFailure(
                "PodEvicted" if evicted else "PodFailed",
                f"pod {name} is Failed: {status.get('message') or status.get('reason') or 'no reason given'}",
            )
    failure = phase_failure or failure
    completed = status.get("phase") == "Succeeded" or any(t.completed for t in terminations)

    index_raw = labels.get(POD_INDEX_LABEL) or meta.get("name", "-0").rsplit("-", 1)[-1]
    return PodObservation(
        name=name,
        uid=meta.get("uid", ""),
        group=labels.get(GROUP_LABEL, ""),
        index=int(index_raw) if str(index_raw).isdigit() else 0,
        restart=int(annotations.get(RESTART_ANNOTATION, "0") or 0),
        template_hash=annotations.get(TEMPLATE_HASH_ANNOTATION, ""),
        created=parse_time(meta.get("creationTimestamp")),
        deletion_deadline=deadline,
        scheduled=conditions.get("PodScheduled") == "True" or bool(pod.get("spec", {}).get("nodeName")),
        ready=conditions.get("Ready") == "True",
        completed=completed and failure is None,
        failure=failure,
        last_checkpoint=last_checkpoint,
        labels=labels,
        phase_failure=phase_failure,
        terminations=tuple(terminations),
        exits=int(cs.get("restartCount") or 0) + (1 if (cs.get("state") or {}).get("terminated") else 0),
        conditions=frozenset(str(t) for t, v in conditions.items() if v == "True"),
        unschedulable=str(scheduling.get("message") or "no message") if refused else None,
        unschedulable_since=parse_time(scheduling.get("lastTransitionTime")) if refused else None,
        ip=status.get("podIP") or None,
    )


def checkpoint_step(report: dict[str, Any] | None) -> int | None:
    """The step of a worker's ``lastCheckpoint`` report, if the report is well-formed (a step >= 0)."""
    step = (report or {}).get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


def merge_witness(listed: PodObservation, seen: PodObservation) -> PodObservation:
    """The listing of a pod plus what a watch event showed of the same pod (same uid) earlier: a container
    may have exited twice since that event, and ``lastState`` keeps only the newest exit, so an exit seen
    in the event but gone from the listing is kept."""
    if listed.uid != seen.uid:
        return listed
    known = {t.index for t in listed.terminations}
    extra = [t for t in seen.terminations if t.index not in known]
    if not extra:
        return listed
    merged = tuple(sorted((*extra, *listed.terminations), key=lambda t: t.index))
    # The checkpoint of an exit seen only in the event counts too (the newest well-formed report wins).
    reports = [
        c
        for c in (listed.last_checkpoint, *(t.last_checkpoint for t in extra))
        if checkpoint_step(c) is not None
    ]
    last_checkpoint = (
        max(reports, key=lambda c: checkpoint_step(c) or 0) if reports else listed.last_checkpoint
    )
    return replace(
        listed, terminations=merged, exits=max(listed.exits, seen.exits), last_checkpoint=last_checkpoint
    )
