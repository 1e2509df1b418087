"""Process-group start-up: env:// rendezvous with clear errors and a timeout instead of a hang.

A group's pods are replaced together on a restart, and deleted at once, so a pod of the old generation
(or one the StatefulSet controller recreated from the old template just before the restart) can still
run for a moment and reach the new rank 0. Left alone it would take a rank's place in the new generation
and, deleted a moment later, fail the generation it was never part of. So when the environment names a
rendezvous (CONVEYOR_RENDEZVOUS: the restart count and the pod template's hash, set by
``PodEnv.rank_environ``), every key of the rendezvous is prefixed with it: ranks of another generation
wait apart, never with this one.

The other way round matters as much: a rank of the new generation can reach the old rank 0 while that
pod is still terminating (its name, and so its address, is the new rank 0's). Left alone it would wait
there under its prefix and fail when that server goes away (or hang out the whole timeout if its network
went first), a failure the operator would count as a second restart. So rank 0 writes its generation into
its store, and any other rank joins a store only once it reads its own generation there; until then it
reconnects, within the rendezvous timeout.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_SECONDS = 300.0
GENERATION_KEY = "conveyor/generation"  # unprefixed: what rank 0 of the store's generation wrote
# How long a rank waits for a reached store to name its generation. Rank 0 writes it as it opens the
# store, so only a store that is not ours (an older release's, or one whose network went away) is silent.
GENERATION_PROBE_SECONDS = 10.0
log = logging.getLogger(__name__)
_REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedInitError(RuntimeError):
    """The rendezvous variables are missing or inconsistent, or a peer never arrived."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def _read_env(environ: Mapping[str, str]) -> tuple[int, int, int]:
    missing = [name for name in _REQUIRED if not environ.get(name)]
    if missing:
        raise DistributedInitError(
            f"torch.distributed env:// rendezvous needs {', '.join(missing)}: launch with `conveyor run` "
            "(or torchrun), or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        )
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local_rank = int(environ.get("LOCAL_RANK", "0"))
        int(environ["MASTER_PORT"])
    except ValueError as err:
        raise DistributedInitError(f"rendezvous variable is not an integer: {err}") from None
    if world < 1 or not 0 <= rank < world:
        raise DistributedInitError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    if local_rank < 0:
        raise DistributedInitError(f"LOCAL_RANK={local_rank} must be >= 0")
    return rank, world, local_rank


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` -> the process's CUDA device when CUDA is present, else the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistributedInitError("device 'cuda' was requested but CUDA is not available on this machine")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(
    backend: str | None = None,
    device: str = "auto",
    timeout_seconds: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> DistInfo:
    """Join the job's process group through env:// (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK).

    NCCL on GPUs, gloo on the CPU. A peer that never arrives fails after ``timeout_seconds`` (default
    300, or CONVEYOR_DIST_TIMEOUT) with the rendezvous address in the message. Idempotent.
    """
    env = os.environ if environ is None else environ
    rank, world, local_rank = _read_env(env)
    dev = pick_device(device, local_rank)
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), dev)
    from conveyor import metrics  # the rank's readiness (/ready on the metrics port)

    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if timeout_seconds is None:
        timeout_seconds = float(env.get("CONVEYOR_DIST_TIMEOUT", DEFAULT_TIMEOUT_SECONDS))
    where = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    if env.get("CONVEYOR_RENDEZVOUS"):
        # A rank of a replaced generation waits here until it is deleted: say which one it is.
        where += f" (rendezvous {env['CONVEYOR_RENDEZVOUS']})"
    # init_method="env://" reads os.environ; mirror an explicit mapping there.
    if environ is not None:
        os.environ.update({k: environ[k] for k in (*_REQUIRED, "LOCAL_RANK") if k in environ})
    timeout = timedelta(seconds=timeout_seconds)
    # why: its collectives take ``group=group.WORLD`` as a default argument, read when it is imported;
    # imported after this point (transformers' model imports do, through torch.distributed.fsdp) it would
    # own the default group for good and keep it running into the interpreter's teardown (see atexit below)
    import torch.distributed.nn.functional  # noqa: F401

    try:
        store = _generation_store(env, rank, timeout)
        dist.init_process_group(
            backend=backend,
            init_method=None if store is not None else "env://",
            store=store,
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=dev if backend == "nccl" else None,
        )
    except (RuntimeError, dist.DistStoreError) as err:
        raise DistributedInitError(
            f"rank {rank}/{world} could not join the process group at {where} within {timeout_seconds:.0f}s "
            f"({type(err).__name__}: {err}); check that every rank started and MASTER_ADDR resolves"
        ) from err
    # A gloo group still alive when the interpreter finalizes can abort the process ("terminate called
    # without an active exception", exit 134): a worker thread that releases a finished collective's
    # tensors then needs the GIL, and a finalizing interpreter ends such a thread with an unwind that
    # std::terminate stops. Destroying the groups at exit joins their workers first, for scripts that
    # end without destroy_distributed() too, provided nothing else holds them (hooks: ``held_weakly``).
    # Not NCCL: destroying a communicator with work left on a dead peer can block, and a failing rank
    # must exit, not hang.
    if backend == "gloo":
        atexit.register(destroy_distributed)
    metrics.READINESS.joined()
    return DistInfo(rank, world, local_rank, backend, dev)


def _generation_store(env: Mapping[str, str], rank: int, timeout: timedelta) -> dist.Store | None:
    """The rendezvous store scoped to CONVEYOR_RENDEZVOUS, or None (plain env://) when it is not set."""
    generation = env.get("CONVEYOR_RENDEZVOUS")
    if not generation:
        return None
    host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    prefix = f"conveyor/{generation}/"
    if rank == 0:
        # wait_for_workers=False: rank 0 does not count connections, which a stale rank would inflate; the
        # prefixed barrier inside init_process_group is what waits for this generation's ranks.
        server = dist.TCPStore(host, port, None, True, timeout, wait_for_workers=False)
        server.set(GENERATION_KEY, generation)
        return dist.PrefixStore(prefix, server)
    deadline = time.monotonic() + timeout.total_seconds()
    seen: set[str] = set()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise dist.DistStoreError(
                f"rank 0 of rendezvous {generation} never opened its store (reached: {', '.join(sorted(seen))})"
            )
        client, found = _join_if_ours(host, port, left, generation)
        if client is not None:
            client.set_timeout(timeout)
            return dist.PrefixStore(prefix, client)
        if found not in seen:
            seen.add(found)
            log.warning(
                f"rendezvous {generation}: {host}:{port} is {found}; waiting for this generation's rank 0",
                extra={"rendezvous": generation, "reached": found},
            )
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _join_if_ours(host: str, port: int, left: float, generation: str) -> tuple[dist.Store | None, str]:
    """Connect to the store at host:port and read the generation its rank 0 wrote: (the connected client,
    "") when it is ``generation``, else (None, what was found there); a store not ours is let go."""
    try:
        client = dist.TCPStore(host, port, None, False, timedelta(seconds=left), wait_for_workers=False)
    except (RuntimeError, dist.DistError) as err:  # nobody listening until the deadline
        return None, f"not reachable ({type(err).__name__})"
    try:
        client.wait([GENERATION_KEY], timedelta(seconds=min(left, GENERATION_PROBE_SECONDS)))
        theirs = client.get(GENERATION_KEY).decode()
    except (RuntimeError, dist.DistError) as err:  # gone while we asked, or silent: another's store
        return None, f"a store without a generation ({type(err).__name__})"
    return (client, "") if theirs == generation else (None, f"rendezvous {theirs}")


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def held_weakly(group: dist.ProcessGroup | None) -> Callable[[], dist.ProcessGroup | None]:
    """``group`` for a hook to call collectives on, without owning it: a model's hooks live as long as the
    user's model, often to the interpreter's teardown, and a group they owned would outlive
    ``destroy_process_group`` with its worker threads (the abort at exit above). The callable raises once
    the group is destroyed. None (the default group) stays None."""
    if group is None:
        return lambda: None
    ref = weakref.ref(group)

    def resolve() -> dist.ProcessGroup:
        live = ref()
        if live is None:
            raise RuntimeError(
                "this model's tensor-parallel process group was destroyed (destroy_process_group): its "
                "shards cannot run any more; keep the group until the last forward"
            )
        return live

    return resolve
