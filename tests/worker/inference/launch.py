"""Spawn the ranks of one replica group as local processes (env:// rendezvous on a free port)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conveyor.utils import free_port

from tests.conftest import subprocess_env


def start_ranks(
    world: int, argv: list[str], extra_env: list[dict[str, str]] | None = None
) -> list[subprocess.Popen]:
    """Start ``python ARGV`` once per rank with RANK/WORLD_SIZE/MASTER_* set; returns the processes."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = subprocess_env(
            RANK=str(rank),
            LOCAL_RANK="0",
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            CONVEYOR_DIST_TIMEOUT="120",
            OMP_NUM_THREADS="1",
            **(extra_env[rank] if extra_env else {}),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    return procs


def wait_ranks(procs: list[subprocess.Popen], timeout: float = 240) -> None:
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out.decode(errors="replace"))
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        details = "\n".join(
            f"--- rank {i} (exit {procs[i].returncode}):\n{outputs[i][-4000:]}" for i in failed
        )
        raise AssertionError(f"ranks {failed} failed:\n{details}")


def run_ranks(world: int, argv: list[str], timeout: float = 240) -> None:
    wait_ranks(start_ranks(world, argv), timeout)


ROOT = Path(__file__).resolve().parents[3]
