"""Engine checkpoints with torch.distributed.checkpoint, keyed by global layer index.

Every rank saves its stage's ``layers.{i}.*`` / ``tied.{key}.*`` weights and their optimizer state
(flattened per parameter name, so it follows the weights to any stage), plus the scheduler, step and
its own RNG state. Replicas and tied copies hold identical entries, which DCP writes once. A checkpoint
saved with P stages loads with any other P: each rank reads the names its stage holds. RNG states are
restored only when the layout is unchanged (they belong to ranks, not layers).
"""

from __future__ import annotations

import contextlib
import pickle
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from conveyor import checkpoint as commit_protocol
from conveyor import metrics
from conveyor.checkpoint import CheckpointError
from conveyor.log import get_logger

if TYPE_CHECKING:
    from conveyor.pipe.engine import PipelineEngine

log = get_logger("conveyor.pipe.checkpoint")
_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_writer() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns that it runs in one process when there is no process group: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _first_line(err: BaseException) -> str:
    """DCP wraps a rank's failure in a multi-line report; its first meaningful line is the cause."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if "Error" in line), lines[0] if lines else type(err).__name__)


def _rng_state() -> bytes:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return pickle.dumps(state)


def _state_dict(engine: PipelineEngine, client_state: Any) -> dict[str, Any]:
    layout = engine.layout
    trainer = {
        "step": engine.global_steps,
        "samples": engine.global_samples,
        "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "loss_scale": engine.loss_scale,
        "client_state": client_state,
        "layout": (layout.replicas, layout.stages, layout.tensor_parallel),
    }
    return {
        "model": engine.module.state_dict(),
        "optimizer": get_optimizer_state_dict(engine.module, engine.optimizer, options=_OPTIM),
        # non-tensor leaves are pickled by DCP; one blob keeps their structure whole
        "trainer": pickle.dumps(trainer),
        f"rng_rank{_rank()}": _rng_state(),
    }


def save(engine: PipelineEngine, root: Path, tag: str | None, client_state: Any, keep: int | None) -> Path:
    started = time.perf_counter()
    name = tag or commit_protocol.step_name(engine.global_steps)
    tmp = commit_protocol.prepare(root, name, _is_writer(), _barrier)
    with _quiet():
        dcp.save(_state_dict(engine, client_state), checkpoint_id=tmp)
    committed = commit_protocol.commit(root, name, keep, _is_writer(), _barrier)
    seconds = time.perf_counter() - started
    metrics.CHECKPOINT_SECONDS.labels(engine.job).observe(seconds)
    metrics.LAST_CHECKPOINT_STEP.labels(engine.job).set(engine.global_steps)
    metrics.LAST_CHECKPOINT_TIME.labels(engine.job).set(committed.time)
    if _rank() == 0:
        log.info(
            "checkpoint committed",
            extra={"path": str(committed.path), "step": engine.global_steps, "seconds": round(seconds, 3)},
        )
    return committed.path


def load(engine: PipelineEngine, root: Path, tag: str | None) -> tuple[Path | None, Any]:
    if tag is None:
        warn = log.warning if _rank() == 0 else None  # every rank decides the same; one says so
        committed = commit_protocol.resume_point(root, warn)
        if committed is None:
            return None, None
        path = committed.path
    else:
        path = root / tag
        problem = commit_protocol.verify(path)
        if problem:
            raise CheckpointError(f"checkpoint {tag!r} in {root} is not complete: {problem}")
    try:
        saved = set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    except Exception as err:  # DCP's reader raises many kinds; the checkpoint is what matters
        raise CheckpointError(f"checkpoint {path} does not load: {_first_line(err)}") from None
    state = _state_dict(engine, None)
    missing = sorted(f"model.{k}" for k in state["model"] if f"model.{k}" not in saved)
    if missing:
        raise CheckpointError(
            f"checkpoint {path} has no weights for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}: "
            "it was saved from a different model (layer list)"
        )
    rng_key = f"rng_rank{_rank()}"
    if rng_key not in saved:
        state.pop(rng_key)
    # partial: other ranks' RNG entries and (with fewer stages now) other stages' layers stay unread
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
    except (Exception, CheckpointException) as err:  # a shard damaged at its size (a BaseException: DCP's)
        raise CheckpointError(f"checkpoint {path} does not load: {_first_line(err)}") from None
    engine.module.load_state_dict(state["model"])
    set_optimizer_state_dict(engine.module, engine.optimizer, state["optimizer"], options=_OPTIM)
    trainer = pickle.loads(state["trainer"])
    if engine.lr_scheduler is not None and trainer["scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(trainer["scheduler"])
    engine.global_steps = trainer["step"]
    engine.global_samples = trainer["samples"]
    engine.loss_scale = trainer["loss_scale"]
    layout = engine.layout
    if trainer["layout"] == (layout.replicas, layout.stages, layout.tensor_parallel) and rng_key in state:
        rng = pickle.loads(state[rng_key])
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    metrics.LAST_CHECKPOINT_STEP.labels(engine.job).set(engine.global_steps)
    if _rank() == 0:
        log.info("checkpoint loaded", extra={"path": str(path), "step": engine.global_steps})
    return path, trainer["client_state"]
