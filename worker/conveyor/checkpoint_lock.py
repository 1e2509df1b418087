"""One run at a time trains into a checkpoint directory.

Two runs saving into one directory interleave their commits: each publishes its own ``step-N`` and
rewrites ``latest``, prunes the other's steps as its own, and a restart resumes from whichever wrote last
(the other run's weights, at a data position of another run). So the process of global rank 0, whose
rank commits (commit_protocol.py), holds an exclusive lock on ``<directory>/conveyor.lock`` from its
start, before any model is read, for its whole life: a second run's rank 0 is refused in one line that
names the directory, the holder and the fix (CheckpointError: exit 2, no restart), while the other ranks
of that run are stopped with it. Under ``conveyor worker`` the rank process holds it for the training it
runs: fine-tuning and a ``train.script`` run in that process, a ``train.command`` in its child, which it
outlives. A restart is not refused by the run it replaces: the lock is a ``flock`` (file_lock.py, which
also says where network filesystems fall short), released by the kernel when its process dies however it
dies, so no crash leaves it stale; and a holder on its way out is waited for a few seconds (a rank stopped
with its worker by the parent-death signal dies just after the worker, and `conveyor run` may restart the
group at once with backoffSeconds 0).

The engine's ``save_checkpoint`` takes the same lock (its committing rank, at its first save, for the
process's life), so a user's own program saving into a directory another program or run saves into is
refused in one line at its first save rather than interleaving (DeepSpeed's engine takes no lock: two
jobs pointed at one directory there overwrite each other's ``latest``). It never refuses its own run:
in the process that holds the lock (fine-tuning, a ``train.script``) taking it again is a no-op, and a
``train.command`` gets ``CONVEYOR_CHECKPOINT_LOCK_HELD``, the directories its rank holds for it (a
child's own flock would conflict with its parent's). A program that only loads takes no lock: a reader
(an evaluation, an export) is never refused.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import IO

from conveyor import file_lock
from conveyor.commit_protocol import LOCK_FILE, CheckpointError

_held: dict[Path, IO[str]] = {}  # by directory: this process's locks, held until it ends (or release)
WAIT_SECONDS = 5.0  # for a holder on its way out
HELD_BY_PARENT_ENV = "CONVEYOR_CHECKPOINT_LOCK_HELD"  # os.pathsep-joined directories a parent holds
_held_by_parent = frozenset(Path(p) for p in os.environ.get(HELD_BY_PARENT_ENV, "").split(os.pathsep) if p)
RUN_FIX = "set spec.checkpoint.path to a directory of this run's own"


def _key(directory: str | Path) -> Path:
    # resolved: one directory named two ways (relative, through a link) must not take a second flock,
    # which its own first one would refuse
    return Path(directory).resolve()


def held_environ() -> dict[str, str]:
    """For a child this process runs the training in: the directories held for it."""
    return {HELD_BY_PARENT_ENV: os.pathsep.join(str(p) for p in _held)} if _held else {}


def hold(
    directory: str | Path,
    job: str = "",
    wait_seconds: float = WAIT_SECONDS,
    field: str = "spec.checkpoint.path",
    fix: str = RUN_FIX,
) -> None:
    """Hold ``directory``'s lock for this process's life (a no-op when it or its parent already does), or
    refuse once another process has held it for ``wait_seconds``; ``field`` and ``fix`` word the refusal
    for the setting that named the directory."""
    path = _key(directory)
    if path in _held or path in _held_by_parent:
        return
    lock = path / LOCK_FILE
    deadline = time.monotonic() + wait_seconds
    try:
        while True:
            try:
                _held[path] = file_lock.take(lock, holder=f"job {job}" if job else "")
                return
            except file_lock.Busy:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
    except file_lock.Busy as busy:
        raise CheckpointError(
            f"{field} {directory} is in use by another run ({busy.holder} holds {lock.name}): two runs saving "
            f"into one directory would interleave their checkpoints; wait for that run to end, or {fix}"
        ) from None
    except OSError as err:
        raise CheckpointError(
            f"{field} {directory}: cannot create {lock} ({err.strerror}): choose a directory this job can write"
        ) from None


def release(directory: str | Path) -> None:
    """Let ``directory`` go before this process ends (a program that trains several runs in turn)."""
    held = _held.pop(_key(directory), None)
    if held is not None:
        held.close()  # closing releases the flock
