"""What the operator knows of a job's committed progress (pure).

Workers report their last committed checkpoint only in their termination message
(``{"lastCheckpoint": {"step": N, "time": ...}}``), which stays visible only while the container's
``state``/``lastState`` shows that exit, and is gone with the pod. So every report seen is kept in status:
per group (``groups[].lastCheckpoint``: inference replicas each commit their own share of the prompts)
and for the job (``status.lastCheckpoint``, the newest of all). A group restart names the best of what is
known; the workers themselves always resume from their ``latest`` checkpoint, reported or not.
"""

from __future__ import annotations

from collections.abc import Iterable

from conveyor.job_status import CheckpointRef, SkippedCheckpoint

from conveyor_operator.observe import PodObservation, checkpoint_step


def reported(pod: PodObservation) -> CheckpointRef | None:
    """The checkpoint a pod's termination message announced, if it is well-formed."""
    step = checkpoint_step(pod.last_checkpoint)
    if step is None:
        return None
    report = pod.last_checkpoint or {}
    time = report.get("time")
    count, last = report.get("skipped"), report.get("lastSkipped")
    skipped = count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None
    last_skipped = None
    if skipped is not None and isinstance(last, dict) and isinstance(last.get("name"), str):
        try:
            last_skipped = SkippedCheckpoint.model_validate(last)
        except ValueError:
            last_skipped = SkippedCheckpoint(name=last["name"])
    return CheckpointRef(
        step=step, time=time if isinstance(time, str) else None, skipped=skipped, last_skipped=last_skipped
    )


def newest(refs: Iterable[CheckpointRef | None]) -> CheckpointRef | None:
    """The highest step (the first of equal steps: an earlier record keeps its commit time), carrying the
    highest count of skipped checkpoints any of them knows (the workers' record only grows)."""
    best: CheckpointRef | None = None
    most_skipped: CheckpointRef | None = None
    for ref in refs:
        if ref is None:
            continue
        if best is None or ref.step > best.step:
            best = ref
        if ref.skipped and (most_skipped is None or ref.skipped > (most_skipped.skipped or 0)):
            most_skipped = ref
    if best is None or most_skipped is None or most_skipped is best:
        return best
    return best.model_copy(
        update={"skipped": most_skipped.skipped, "last_skipped": most_skipped.last_skipped}
    )


def skip_event(before: CheckpointRef | None, after: CheckpointRef | None) -> str | None:
    """The Warning Event's message when the workers' count of skipped checkpoints has grown, else None."""
    now = (after.skipped or 0) if after is not None else 0
    was = (before.skipped or 0) if before is not None else 0
    if now <= was or after is None:
        return None
    last = after.last_skipped
    what = f"{last.name} ({last.reason or 'no reason given'})" if last is not None else "one"
    return (
        f"a partial or corrupt checkpoint was skipped on resume: {what}; the workers resumed from the last "
        f"complete one before it ({now} skipped over the job's life)"
    )


def job_checkpoint(known: CheckpointRef | None, pods: Iterable[PodObservation]) -> CheckpointRef | None:
    """``status.lastCheckpoint``: the newest checkpoint any pod of the job has reported so far."""
    return newest([known, *(reported(p) for p in pods)])


def group_checkpoint(
    group: str,
    known: Iterable[CheckpointRef | None],
    pods: Iterable[PodObservation],
) -> CheckpointRef | None:
    """A group's last checkpoint: what its status already holds (its last report, what its last restart
    resumed from; for a train job's one group, the job's) and what any pod of the group reports now, of
    any generation, listed or seen only in a watch event."""
    found = newest([*known, *(reported(p) for p in pods if p.group == group)])
    # Age and interval are the job's (checkpoint_age.py), measured at one reconcile: not kept per group.
    return found.model_copy(update={"age_seconds": None, "interval_seconds": None}) if found else None


def describe_resume(checkpoint: CheckpointRef | None) -> str:
    """What follows "resuming from" in the restart Event. The operator does not choose the checkpoint
    (the workers read their ``latest``, which may be newer than any report), so without a report it
    says that none was reported, not that the job starts over."""
    if checkpoint is None:
        return "the latest committed checkpoint (none reported yet: workers report theirs when they exit)"
    when = f", committed {checkpoint.time}" if checkpoint.time else ""
    return f"checkpoint step {checkpoint.step} or later (the last one reported{when})"
