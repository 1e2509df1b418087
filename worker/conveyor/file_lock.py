"""An exclusive (or shared) ``flock`` on a lock file, held until its file is closed or its process ends.

Why ``flock`` and not a pid file: the kernel releases it when the holding process dies, however it dies
(SIGKILL, OOM, a node's container runtime tearing the pod down), so a crashed run never leaves a stale
lock for its restart to trip over, and nothing has to guess whether a recorded pid is still the holder.
The exclusive holder writes who it is into the file, for the refusal of the next one to name.

Network filesystems: Linux emulates ``flock`` on NFS with the server's byte-range locks (NFSv4, or v3
with lockd), so holders on different hosts exclude each other there; a mount with ``nolock`` or
``local_lock=flock|all``, and FUSE filesystems that ignore locks (s3fs, gcsfuse, some CSI drivers), keep a
lock on one host only, and two hosts are then not kept apart. After a host dies, an NFSv4 server keeps
its lock until the client's lease expires (90 s by default): a start within that window is refused.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO


class Busy(Exception):
    """Another process holds the lock; ``holder`` is what the exclusive holder wrote (or a guess)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def take(lock_path: Path, exclusive: bool = True, holder: str = "") -> IO[str]:
    """``lock_path`` (created with its directory) open and ``flock``ed, without waiting; raises Busy when
    another process holds it, OSError when it cannot be created. ``holder``: words the exclusive holder
    writes after its pid and host (a job's name)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock_path, "a+")  # noqa: SIM115 (held until closed or the process ends)
    try:
        fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        found = f.read().strip() or "another process"  # (shared holders write no name)
        f.close()
        raise Busy(found) from None
    if exclusive:  # the one holder names itself; shared holders would overwrite each other's names
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}{f' ({holder})' if holder else ''}\n")
        f.flush()
    return f
