"""``conveyor worker``: the pod entry point.

Reads the pod's CONVEYOR_* environment once, starts one process per tensor-parallel rank (each runs
``conveyor.rank``), and stops them all when one fails, exiting with the first failure's code, so that
the operator sees one failed container and restarts the whole group.
"""

from __future__ import annotations

import argparse
import os
import sys

from conveyor.env import EnvError, PodEnv
from conveyor.log import configure, get_logger
from conveyor.supervise import Child, run_group

log = get_logger("conveyor.worker")


def main(args: argparse.Namespace | None = None) -> int:
    configure()
    try:
        pod = PodEnv.from_environ()
    except EnvError as err:
        print(f"conveyor worker: {err}", file=sys.stderr)
        return 2
    configure(job=pod.job, replica=pod.replica, stage=pod.stage)
    log.info(
        "worker starting",
        extra={
            "ranks": pod.tensor_parallel,
            "world_size": pod.world_size,
            "restart": pod.restart,
            "mode": pod.mode,
        },
    )
    prefix_logs = os.environ.get("CONVEYOR_LOG_PREFIX") == "1"
    children = [
        Child(
            name=f"rank {pod.global_rank(local)}",
            argv=[sys.executable, "-m", "conveyor.rank", str(local)],
            env={**os.environ, **pod.rank_environ(local)},
            prefix=f"[r{pod.replica} s{pod.stage} rank {pod.global_rank(local)}] " if prefix_logs else None,
        )
        for local in range(pod.tensor_parallel)
    ]
    outcome = run_group(children, grace_seconds=float(os.environ.get("CONVEYOR_GRACE_SECONDS", "10")))
    if outcome.code:
        log.error("worker failed", extra={"failed": outcome.failed, "exit_code": outcome.code})
    else:
        log.info("worker finished")
    return outcome.code
