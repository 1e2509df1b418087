"""Start the N ranks of one tensor-parallel group as local processes and say how they ended.

One GPU per rank with NCCL when there are enough GPUs; otherwise every rank shares GPU 0 over gloo (NCCL
refuses two ranks on one device; gloo all-reduces CUDA tensors through the host), or the CPU over gloo.
Each rank runs in its own session, so a group that hangs (a peer died inside a collective) is killed
whole at its timeout, children included, and a segfault is reported as the signal, not lost.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from conveyor.utils import free_port


@dataclass(frozen=True)
class Layout:
    """Where the ranks of a group of ``world`` run."""

    backend: str  # nccl or gloo
    device: str  # cuda or cpu
    local_ranks: list[int]
    note: str  # said in every report: shared-GPU numbers are not one-GPU-per-rank numbers

    @property
    def shared_gpu(self) -> bool:
        return self.device == "cuda" and self.backend == "gloo"


def layout(world: int, device: str = "auto") -> Layout:
    """NCCL with one GPU per rank when there are ``world`` GPUs, gloo on GPU 0 when fewer, gloo on the CPU
    without CUDA (or with ``device='cpu'``)."""
    gpus = torch.cuda.device_count() if device != "cpu" else 0  # NVML: no CUDA context in the driver
    if device == "cuda" and gpus == 0:
        raise SystemExit("--device cuda: no CUDA device on this machine (use --device auto or cpu)")
    if gpus == 0:
        return Layout("gloo", "cpu", [0] * world, f"{world} CPU processes over gloo")
    if gpus >= world:
        return Layout("nccl", "cuda", list(range(world)), f"{world} GPUs, one per rank, NCCL")
    return Layout("gloo", "cuda", [0] * world, f"{world} ranks sharing one GPU over gloo")


@dataclass
class GroupResult:
    returncodes: list[int | None]  # None: killed here (timed out, or a peer had died)
    timed_out: bool
    seconds: float
    logs: list[Path] = field(default_factory=list)

    def failure(self, timeout: float) -> str | None:
        """None when every rank exited 0, else why the group ended: the first signal, exit code or the
        timeout, with the failing rank's last log lines."""
        if self.timed_out:
            return f"timed out after {timeout:.0f}s"
        for rank, rc in enumerate(self.returncodes):
            if rc is not None and rc < 0:
                return f"crashed: signal {-rc} ({signal.Signals(-rc).name}, rank {rank})"
        for rank, rc in enumerate(self.returncodes):
            if rc:
                return f"exited {rc} (rank {rank}): {tail(self.logs[rank])}"
        return None


def tail(path: Path, chars: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


def run_group(
    argv: list[str], lay: Layout, logdir: Path, name: str, timeout: float, env: dict[str, str] | None = None
) -> GroupResult:
    """Run ``python ARGV`` once per rank of ``lay`` (env:// rendezvous on a free port), logs in
    ``logdir/NAME.rankR.log``; kill every rank's session at ``timeout``."""
    world = len(lay.local_ranks)
    port = free_port()
    logdir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    t0 = time.perf_counter()
    for rank in range(world):
        rank_env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(lay.local_ranks[rank]),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "CONVEYOR_DIST_TIMEOUT": str(int(timeout)),
            **(env or {}),
        }
        log = logdir / f"{name}.rank{rank}.log"
        logs.append(log)
        with open(log, "wb") as f:
            procs.append(
                subprocess.Popen(
                    [sys.executable, *argv],
                    env=rank_env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    deadline = t0 + timeout
    # poll all ranks: the one that died is seldom rank 0, and its peers then block in a collective
    while any(p.poll() is None for p in procs) and time.perf_counter() < deadline:
        if any(p.poll() for p in procs):
            break
        time.sleep(0.2)
    timed_out = any(p.poll() is None for p in procs) and time.perf_counter() >= deadline
    killed = []
    for rank, p in enumerate(procs):
        if p.poll() is None:
            killed.append(rank)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait()
    codes = [None if rank in killed else p.returncode for rank, p in enumerate(procs)]
    return GroupResult(codes, timed_out, time.perf_counter() - t0, logs)
