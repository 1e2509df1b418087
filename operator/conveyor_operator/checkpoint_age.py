"""How old the job's last committed checkpoint is, and when that is too old (pure).

A train job that runs but no longer commits checkpoints (a full volume, a script that stopped calling
``save_checkpoint``, steps that slowed to a crawl) loses more and more work to the next restart while
looking healthy. ``status.lastCheckpoint`` gets its age (whole minutes, so the status is rewritten at
most once a minute) and the observed time per ``checkpoint.every`` steps (from the last two checkpoints
seen); the job is ``CheckpointStale`` when its running train job's checkpoint is older than
``checkpoint.staleAfterSeconds``, or by default 3 x that observed interval. Before any checkpoint, the
age counts from when every group was running; without the field and before two checkpoints were seen
(no rate yet), nothing is judged.

The checkpoint comes from the workers: rank 0's ``conveyor_last_checkpoint_*`` metrics while it runs
(``scrape.py``) and every worker's termination message when it exits (``progress.py``).
"""

from __future__ import annotations

from datetime import datetime

from conveyor.job_status import CheckpointRef, GroupStatus, Phase
from conveyor.spec import Mode, PipelineJobSpec

from conveyor_operator.observe import parse_time

STALE_INTERVALS = 3  # the default threshold, in observed checkpoint intervals


def age_seconds(ref: CheckpointRef | None, now: datetime) -> float | None:
    when = parse_time(ref.time) if ref is not None else None
    return max(0.0, (now - when).total_seconds()) if when is not None else None


def refresh(
    previous: CheckpointRef | None, current: CheckpointRef | None, every: int, now: datetime
) -> CheckpointRef | None:
    """``current`` with its age and the interval per ``every`` steps, learnt when the step moved on from
    ``previous`` (the last reconcile's record) and kept otherwise."""
    if current is None:
        return None
    interval = previous.interval_seconds if previous is not None else None
    before, after = (parse_time(r.time) if r is not None else None for r in (previous, current))
    if previous is not None and before is not None and after is not None and current.step > previous.step:
        elapsed = (after - before).total_seconds()
        if elapsed > 0:
            interval = round(elapsed * every / (current.step - previous.step), 3)
    age = age_seconds(current, now)
    return current.model_copy(
        update={"age_seconds": int(age // 60) * 60 if age is not None else None, "interval_seconds": interval}
    )


def threshold(spec: PipelineJobSpec, ref: CheckpointRef | None) -> float | None:
    if spec.checkpoint is not None and spec.checkpoint.stale_after_seconds is not None:
        return float(spec.checkpoint.stale_after_seconds)
    if ref is not None and ref.interval_seconds:
        return STALE_INTERVALS * ref.interval_seconds
    return None


def stale(
    spec: PipelineJobSpec,
    phase: Phase,
    ref: CheckpointRef | None,
    groups: list[GroupStatus],
    now: datetime,
) -> tuple[str, str] | None:
    """(reason, message) of CheckpointStale for a running train job, else None."""
    if spec.mode != Mode.TRAIN or phase != Phase.RUNNING:
        return None
    limit = threshold(spec, ref)
    if limit is None:
        return None
    age = age_seconds(ref, now)
    if age is None:  # no checkpoint yet: count from when the job last came up whole
        running = [parse_time(g.running_since) for g in groups]
        if not running or any(t is None for t in running):
            return None
        age = (now - max(t for t in running if t is not None)).total_seconds()
        what = "no checkpoint committed"
    else:
        assert ref is not None
        what = f"the last committed checkpoint (step {ref.step}, {ref.time}) is"
    if age <= limit:
        return None
    how = (
        "checkpoint.staleAfterSeconds"
        if spec.checkpoint is not None and spec.checkpoint.stale_after_seconds is not None
        else f"{STALE_INTERVALS} x the observed {ref.interval_seconds if ref else 0:.0f}s per checkpoint.every steps"
    )
    if ref is None or ref.time is None:
        return "CheckpointStale", f"{what} in {age:.0f}s of running, over {limit:.0f}s ({how})"
    return "CheckpointStale", f"{what} {age:.0f}s old, over {limit:.0f}s ({how})"
