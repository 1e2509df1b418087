"""A group the scheduler cannot place (pure): observed pods -> the ``Unschedulable`` condition.

Without a gang scheduler a group's StatefulSet creates all its pods and the scheduler binds those that
fit: a group can sit with some ranks running and the rest Pending, waiting for a peer that never comes.
A pod whose PodScheduled condition has been False (reason Unschedulable) for longer than
``placement.unschedulableTimeoutSeconds`` makes the job report ``Unschedulable=True``, naming the pods
and the scheduler's message, instead of looking half-running. Nothing is restarted for it: a new pod
would be just as unschedulable; capacity (or a change of the spec) is what helps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from conveyor_operator.observe import PodObservation

MAX_PODS_NAMED = 8  # a long list of pod names says no more than its count


@dataclass(frozen=True)
class Finding:
    message: str | None  # the condition's message; None: no group is stuck beyond its timeout
    wait_seconds: float | None  # when a pod unschedulable now passes the timeout (requeue), if any


def _since(pod: PodObservation) -> datetime | None:
    return pod.unschedulable_since or pod.created


def find(
    groups: Iterable[tuple[str, Sequence[PodObservation]]], timeout_seconds: int, now: datetime
) -> Finding:
    """Every group's pods unschedulable for longer than ``timeout_seconds``, in one message."""
    timeout = timedelta(seconds=timeout_seconds)
    parts: list[str] = []
    wait: float | None = None
    for group, pods in groups:
        pending = [p for p in pods if p.unschedulable is not None and not p.deleting]
        stuck = []
        for pod in pending:
            since = _since(pod)
            left = (since + timeout - now).total_seconds() if since is not None else 0.0
            if left <= 0:
                stuck.append(pod)
            else:
                wait = left if wait is None else min(wait, left)
        if not stuck:
            continue
        names = sorted(p.name for p in stuck)
        shown = ", ".join(names[:MAX_PODS_NAMED]) + (
            f" and {len(names) - MAX_PODS_NAMED} more" if len(names) > MAX_PODS_NAMED else ""
        )
        parts.append(
            f"group {group}: {len(stuck)} of {len(pods)} pods unschedulable for over {timeout_seconds}s "
            f"({shown}): {stuck[0].unschedulable}"
        )
    return Finding(message="; ".join(parts) or None, wait_seconds=wait)
