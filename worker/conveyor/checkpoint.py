"""The checkpoint commit protocol shared by training and batch inference (docs/design.md).

Every rank writes into ``step-{N}.tmp/``; after a barrier rank 0 renames it to ``step-{N}/`` and then
atomically replaces ``latest`` (write ``latest.tmp``, fsync, rename). A directory that ``latest`` does not
name never counts, so a crash at any moment leaves the previous checkpoint in force. The last ``keep``
committed ``step-*`` directories are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    pass


@dataclass(frozen=True)
class Committed:
    """A committed checkpoint: its directory name, path, step and commit time (Unix seconds)."""

    name: str
    path: Path
    step: int | None
    time: float

    def as_status(self) -> dict[str, Any]:
        """The ``lastCheckpoint`` object of the termination message and of status."""
        return {"step": self.step, "time": rfc3339(self.time)}


def rfc3339(unix_seconds: float | None = None) -> str:
    """A Unix time (default: now) as Kubernetes writes times."""
    return datetime.fromtimestamp(time.time() if unix_seconds is None else unix_seconds, UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def step_name(step: int) -> str:
    return f"step-{step}"


def staging_dir(root: Path, name: str) -> Path:
    return root / f"{name}.tmp"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (the directory entry is data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest(root: str | Path) -> Committed | None:
    """The checkpoint ``latest`` names, or None when there is none (or it names a missing directory)."""
    root = Path(root)
    pointer = root / LATEST
    try:
        name = pointer.read_text().strip()
        when = pointer.stat().st_mtime
    except FileNotFoundError:
        return None
    path = root / name
    if not name or not path.is_dir():
        return None
    match = _STEP_DIR.match(name)
    return Committed(name, path, int(match.group(1)) if match else None, when)


def prepare(root: Path, name: str, is_writer: bool, barrier: Callable[[], None]) -> Path:
    """Create an empty staging directory for ``name`` (a leftover from a crash is discarded)."""
    tmp = staging_dir(root, name)
    if is_writer:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()  # nobody writes before the directory is fresh
    return tmp


def commit(
    root: Path, name: str, keep: int | None, is_writer: bool, barrier: Callable[[], None]
) -> Committed:
    """Publish ``name.tmp`` as ``name`` and point ``latest`` at it. Call on every rank after writing."""
    barrier()  # every rank has finished writing into the staging directory
    if is_writer:
        tmp, final = staging_dir(root, name), root / name
        current = latest(root)
        if final.exists():
            if current is not None and current.name == name:
                raise CheckpointError(f"{final} is already the committed checkpoint; save under another tag")
            shutil.rmtree(final)  # an uncommitted leftover of the same name
        os.rename(tmp, final)
        pointer_tmp = root / (LATEST + ".tmp")
        with open(pointer_tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, root / LATEST)  # the commit point
        fsync_dir(root)
        if keep:
            prune(root, keep)
    barrier()  # nobody reads `latest` before it is written
    committed = latest(root)
    if committed is None or committed.name != name:
        raise CheckpointError(
            f"checkpoint {name} in {root} was not committed (is {root} shared by all ranks?)"
        )
    return committed


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` committed step directories (never the one ``latest`` names),
    and staging directories of older steps."""
    current = latest(root)
    steps = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))
    )
    survivors = {p for _, p in steps[-keep:]} | ({current.path} if current else set())
    for _, path in steps:
        if path not in survivors:
            shutil.rmtree(path, ignore_errors=True)


def write_termination_message(
    path: str | Path | None,
    completed: bool,
    last_checkpoint: Committed | dict[str, Any] | None = None,
    message: str | None = None,
    cause: str | None = None,
) -> dict[str, Any]:
    """The JSON a worker leaves in CONVEYOR_TERMINATION_LOG (the operator reads it as the pod's
    termination message): ``{"completed": true, "lastCheckpoint": {"step": N, "time": ...}}``;
    ``last_checkpoint`` is a committed checkpoint or such a status object already."""
    body: dict[str, Any] = {"completed": completed}
    if last_checkpoint is not None:
        if isinstance(last_checkpoint, Committed):
            last_checkpoint = last_checkpoint.as_status()
        body["lastCheckpoint"] = last_checkpoint
    if message:
        body["message"] = message[-3000:]  # Kubernetes keeps at most 4096 bytes
    if cause:
        body["cause"] = cause[-800:]  # the failed rank's one line (failure.py), for `conveyor run` to print
    if path:
        Path(path).write_text(json.dumps(body))
    return body
