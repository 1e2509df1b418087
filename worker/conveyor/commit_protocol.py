"""The checkpoint commit protocol shared by training and batch inference (docs/design.md).

Every rank writes into ``step-{N}.tmp/``; after a barrier rank 0 renames it to ``step-{N}/`` and then
atomically replaces ``latest`` (write ``latest.tmp``, fsync, rename). A directory that ``latest`` does not
name never counts, so a crash at any moment leaves the previous checkpoint in force. The last ``keep``
committed ``step-*`` directories are kept.

Before the rename rank 0 writes ``MANIFEST.json`` into the directory: every file the ranks wrote, with its
size. A resume (``resume_point``) trusts a checkpoint only when every file is there at its size: when
``latest`` names a missing or damaged directory it falls back to the newest complete ``step-*``, with a
warning naming what it skipped, and refuses in one line when there are checkpoints but none is complete.
"""

from __future__ import annotations

import contextlib
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
MANIFEST = "MANIFEST.json"
LOCK_FILE = "conveyor.lock"  # the running job's lock on the directory (checkpoint_lock.py)
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STAGING_DIR = re.compile(r"^step-(\d+)\.tmp$")


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


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a checkpoint's directory beside ``latest`` and the staging directories, or
    None: it must be a plain name that none of the protocol's own files use."""
    if name in (LATEST, LOCK_FILE, ".", "..") or name.startswith(LATEST + "."):
        return f"{name!r} is a name the commit protocol uses itself"
    if name.endswith(".tmp"):
        return "a name ending in .tmp is a staging directory's"
    if "/" in name or os.sep in name:
        return "a path separator would put it outside the checkpoint directory's listing"
    return None


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
            if current is not None and current.name == name and verify(final) is None:
                raise CheckpointError(f"{final} is already the committed checkpoint; save under another tag")
            # an uncommitted leftover of the same name, or the damaged one a resume skipped (a crash
            # before the rename below leaves `latest` naming nothing: a resume falls back, as it did)
            shutil.rmtree(final)
        write_manifest(tmp)
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


def write_manifest(directory: Path) -> None:
    """Record every file of a checkpoint and its size (after the barrier: every rank has written)."""
    files = {
        str(f.relative_to(directory)): f.stat().st_size
        for f in sorted(directory.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)


def verify(directory: Path) -> str | None:
    """None when the checkpoint is complete, else what is wrong with it, in words. A checkpoint from before
    manifests counts when torch.distributed.checkpoint's ``.metadata`` is there (all that can be checked)."""
    if not directory.is_dir():
        return "missing"
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return None if (directory / ".metadata").is_file() else f"no {MANIFEST} (never committed)"
    try:
        files: dict[str, int] = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} unreadable ({err})"
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} at commit"
    return None


@dataclass(frozen=True)
class Skipped:
    """A checkpoint a resume passed over: its directory name, step, and what is wrong with it."""

    name: str
    step: int | None
    problem: str
    named_by_latest: bool = False

    def describe(self) -> str:
        return f"{self.name} ({'named by latest, ' if self.named_by_latest else ''}{self.problem})"


def resume_point(root: str | Path, warn: Callable[[str], None] | None = None) -> Committed | None:
    """The checkpoint to resume from: the one ``latest`` names if it is complete, else the newest complete
    ``step-*`` (``warn`` is told what was skipped). None when there is no checkpoint at all; raises
    CheckpointError (one line) when there are some but none is complete."""
    committed, skipped = resume_point_skipping(root)
    if committed is not None and skipped and warn is not None:
        warn(describe_skips(root, committed, skipped))
    return committed


def describe_skips(root: str | Path, committed: Committed, skipped: list[Skipped]) -> str:
    return f"resuming from {committed.name} in {root}; skipped {'; '.join(s.describe() for s in skipped)}"


def resume_point_skipping(root: str | Path) -> tuple[Committed | None, list[Skipped]]:
    """``resume_point``'s choice and the checkpoints it skipped on the way (newest first), for whoever
    reports them (skipped_checkpoints.py)."""
    root = Path(root)
    if not root.is_dir():
        return None, []
    named = latest(root)
    pointed = None
    with contextlib.suppress(FileNotFoundError):
        pointed = (root / LATEST).read_text().strip() or None
    steps = sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))),
        reverse=True,
    )
    candidates = ([root / pointed] if pointed else []) + [p for _, p in steps if p.name != pointed]
    skipped: list[Skipped] = []
    for path in candidates:
        problem = verify(path)
        match = _STEP_DIR.match(path.name)
        step = int(match.group(1)) if match else None
        if problem is None:
            if named is not None and named.path == path:
                return named, skipped
            return Committed(path.name, path, step, path.stat().st_mtime), skipped
        skipped.append(Skipped(path.name, step, problem, named_by_latest=path.name == pointed))
    if skipped:
        raise CheckpointError(
            f"no complete checkpoint in {root}: {'; '.join(s.describe() for s in skipped)}; restore one, "
            "or move them away to start from step 0"
        )
    return None, []


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
    # A staging directory left by a kill is only replaced when its step is saved again, which a changed
    # `every` or a resume past it never does. One at or below the committed step can never be published.
    if current is not None and current.step is not None:
        for path in root.iterdir():
            m = _STAGING_DIR.match(path.name)
            if m and int(m.group(1)) <= current.step and path.is_dir():
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
