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
group at once with backoffSeconds 0). The engine's ``save_checkpoint`` called by a program outside
``conveyor worker`` takes no lock.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import IO

from conveyor import file_lock
from conveyor.commit_protocol import LOCK_FILE, CheckpointError

_held: dict[Path, IO[str]] = {}  # by directory: this process's locks, held until it ends (or release)
WAIT_SECONDS = 5.0  # for a holder on its way out


def hold(directory: str | Path, job: str = "", wait_seconds: float = WAIT_SECONDS) -> None:
    """Hold ``directory``'s lock for this process's life (a no-op when it already does), or refuse once
    another process has held it for ``wait_seconds``."""
    path = Path(directory).absolute()
    if path in _held:
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
            f"spec.checkpoint.path {directory} is in use by another run ({busy.holder} holds {lock.name}): two "
            "runs saving into one directory would interleave their checkpoints; wait for that run to end, or "
            "set spec.checkpoint.path to a directory of this run's own"
        ) from None
    except OSError as err:
        raise CheckpointError(
            f"spec.checkpoint.path {directory}: cannot create {lock} ({err.strerror}): choose a directory "
            "this job can write"
        ) from None


def release(directory: str | Path) -> None:
    """Let ``directory`` go before this process ends (a program that trains several runs in turn)."""
    held = _held.pop(Path(directory).absolute(), None)
    if held is not None:
        held.close()  # closing releases the flock
