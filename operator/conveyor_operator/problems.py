"""The problem conditions of a running job (pure): ``Unschedulable`` (unschedulable.py) and
``CheckpointStale`` (checkpoint_age.py), gathered for ``reconcile.py``; their Condition objects are
``conditions.problem_conditions``."""

from __future__ import annotations

from datetime import datetime

from conveyor.job_status import Phase, PipelineJobStatus
from conveyor.spec import PipelineJobSpec

from conveyor_operator import checkpoint_age, unschedulable
from conveyor_operator.phase import GroupPods

Found = dict[str, tuple[str, str] | None]


def report(
    status: PipelineJobStatus,
    old: PipelineJobStatus,
    spec: PipelineJobSpec,
    members_of: dict[str, GroupPods],
    now: datetime,
) -> tuple[Found, float | None]:
    """(condition type -> (reason, message) or None, seconds until a pod passes its unschedulable timeout).
    Also refreshes ``status.lastCheckpoint``'s age and interval."""
    every = spec.checkpoint.every if spec.checkpoint is not None else 1
    status.last_checkpoint = checkpoint_age.refresh(old.last_checkpoint, status.last_checkpoint, every, now)
    found: Found = {
        "CheckpointStale": checkpoint_age.stale(
            spec, Phase(status.phase), status.last_checkpoint, status.groups, now
        )
    }
    stuck = unschedulable.find(
        ((name, m.live) for name, m in members_of.items()), spec.placement.unschedulable_timeout_seconds, now
    )
    found["Unschedulable"] = ("Unschedulable", stuck.message) if stuck.message is not None else None
    return found, stuck.wait_seconds
