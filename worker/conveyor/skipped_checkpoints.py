"""Checkpoints a resume skipped as partial or corrupt, recorded where the operator can see them.

``commit_protocol.resume_point`` falls back from a damaged ``latest`` to the newest complete checkpoint;
the work between the two is redone, and a person should know. The skip happens once, at a rank's start,
and the damaged directory is replaced as soon as training commits that step again, so the fact must be
kept: rank 0 appends it to ``SKIPPED.jsonl`` in the checkpoint directory (one JSON object per skipped
checkpoint, written atomically), which outlives the process and the pod. From there it reaches the
operator by the two ways a worker already reports its checkpoint:

- rank 0's metrics while it runs: ``conveyor_checkpoints_skipped`` (how many are recorded) and
  ``conveyor_checkpoint_last_skipped_step{reason}`` (the newest one; operator's scrape.py);
- every termination message: ``lastCheckpoint.skipped`` and ``lastCheckpoint.lastSkipped``
  (``with_skipped``; the operator's progress.py).

The count is over the job's life (the record is on the job's volume); the same damaged directory skipped
again by a later restart, before it was replaced, is the same skip and is recorded once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conveyor.commit_protocol import Skipped, rfc3339

RECORD = "SKIPPED.jsonl"


def read(root: str | Path) -> list[dict[str, Any]]:
    """The recorded skips, oldest first (an unreadable line is left out, never fatal: it is a report)."""
    try:
        lines = (Path(root) / RECORD).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            out.append(entry)
    return out


def record(root: str | Path, skipped: Sequence[Skipped], resumed_from: str | None) -> list[dict[str, Any]]:
    """Add ``skipped`` to the record (those not in it yet: same directory, same problem); returns it all.
    Call on one rank only (rank 0): the file is replaced whole, atomically."""
    root = Path(root)
    entries = read(root)
    known = {(e.get("name"), e.get("reason")) for e in entries}
    added = [
        {"name": s.name, "step": s.step, "reason": s.problem, "time": rfc3339(), "resumedFrom": resumed_from}
        for s in reversed(skipped)  # oldest first, like the record
        if (s.name, s.problem) not in known
    ]
    if not added:
        return entries
    entries += added
    tmp = root / (RECORD + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / RECORD)
    return entries


def summary(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"skipped": N, "lastSkipped": {...}}`` for a termination message's lastCheckpoint ({} for none)."""
    if not entries:
        return {}
    last = entries[-1]
    return {
        "skipped": len(entries),
        "lastSkipped": {k: last.get(k) for k in ("name", "step", "reason", "time")},
    }


def with_skipped(last_checkpoint: dict[str, Any] | None, root: str | Path | None) -> dict[str, Any] | None:
    """A termination message's lastCheckpoint with the record's summary (unchanged when nothing was
    skipped, or there is no checkpoint to report)."""
    if last_checkpoint is None or root is None:
        return last_checkpoint
    return {**last_checkpoint, **summary(read(root))}


def publish(job: str, entries: Sequence[dict[str, Any]]) -> None:
    """Rank 0's gauges (the operator scrapes them while the rank runs)."""
    from conveyor import metrics

    if not entries:
        return
    last = entries[-1]
    metrics.CHECKPOINTS_SKIPPED.labels(job).set(len(entries))
    metrics.LAST_SKIPPED_STEP.clear()  # one series: the newest skip
    step = last.get("step")
    metrics.LAST_SKIPPED_STEP.labels(job, str(last["name"]), str(last.get("reason") or "")[:200]).set(
        step if isinstance(step, int) else -1
    )
