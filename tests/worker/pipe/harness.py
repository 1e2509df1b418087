"""Multi-process test harness: run a function on W gloo ranks (spawned processes) and collect what each
returns, or every rank's traceback."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import traceback
from collections.abc import Callable
from typing import Any

from conveyor.utils import free_port


def _entry(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, results: Any) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
        from conveyor.distributed import destroy_distributed, init_distributed

        init_distributed(
            backend="gloo", device="cpu", timeout_seconds=float(os.environ.get("TEST_DIST_TIMEOUT", 60))
        )
        out = fn(rank, world, *args)
        destroy_distributed()
        # plain pickle: tensors through a multiprocessing queue would go by shared memory, which dies with
        # this process
        results.put(("ok", rank, pickle.dumps(out)))
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 180) -> list[Any]:
    """fn(rank, world, *args) on each rank; returns the results ordered by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    errors: list[str] = []
    try:
        while len(got) + len(errors) < world:
            status, rank, payload = results.get(timeout=timeout)
            if status == "ok":
                got[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                timeout = min(timeout, 20)  # peers of a failed rank fail soon; do not wait long for them
    except queue.Empty:
        errors.append(f"ranks {sorted(set(range(world)) - set(got))} gave no result in time")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [got[r] for r in range(world)]
