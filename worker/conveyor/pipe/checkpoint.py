"""Engine checkpoints with torch.distributed.checkpoint, keyed by global layer index.

Every rank saves its stage's ``layers.{i}.*`` / ``tied.{key}.*`` weights and their optimizer state
(flattened per parameter name, so it follows the weights to any stage), plus the scheduler, step and
its own RNG state. Replicas and tied copies hold identical entries, which DCP writes once. A checkpoint
saved with P stages loads with any other P: each rank reads the names its stage holds. RNG states are
restored only when the layout is unchanged (they belong to ranks, not layers). Under tensor parallelism
a shard's entries are keyed by its tensor rank (``layers.3.block.attn.wqkv.weight@tp1of2``,
pipe/sharding.py); loaded with another tensorParallel, each rank reads the saved shards overlapping its
part and cuts it out (pipe/reshard.py), weights and optimizer state alike.

An engine is seen through ``TrainState`` (its parts and its counters), so the pipeline engine and the
data-parallel engine save and load the same way.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

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

from conveyor import checkpoint_lock, commit_protocol, metrics, skipped_checkpoints
from conveyor.commit_protocol import CheckpointError
from conveyor.log import get_logger
from conveyor.pipe import reshard
from conveyor.pipe.optim import DeepSpeedSchedule
from conveyor.pipe.sharding import ShardLayout

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


_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception): ")


def _first_line(err: BaseException) -> str:
    """DCP wraps a rank's failure in a multi-line report holding the rank's traceback; the cause is its
    ``SomeError: message`` line (not a source line such as ``raise ValueError(`` above it)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    causes = [line for line in lines if _EXCEPTION_LINE.match(line)]
    return (
        causes[0]
        if causes
        else next((line for line in lines if "Error" in line), lines[0] if lines else type(err).__name__)
    )


def _rng_state() -> bytes:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return pickle.dumps(state)


@dataclass(frozen=True)
class TrainParts:
    """What holds tensors: the model (this rank's part), its optimizer and scheduler, and the layout
    (replicas, stages, tensor_parallel) the RNG states belong to. ``shard_keys``: parameter name -> its
    checkpoint key, for the tensor-parallel shards this rank (tensor rank ``tp_rank``) holds;
    ``shard_layouts``: how tensor parallelism splits each parameter it splits (or would, at size 1)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    layout: tuple[int, int, int]
    shard_keys: Mapping[str, str] = field(default_factory=dict)
    shard_layouts: Mapping[str, ShardLayout] = field(default_factory=dict)
    tp_rank: int = 0


class TrainState(Protocol):
    """An engine as a checkpoint sees it. ``counters()`` holds ``step`` (the checkpoint's name) and
    whatever else the engine counts (samples, loss scale); ``restore_counters`` gets them back."""

    job: str

    def train_parts(self) -> TrainParts: ...

    def counters(self) -> dict[str, Any]: ...

    def restore_counters(self, counters: dict[str, Any]) -> None: ...


def _rename(state: dict[str, Any], names: Mapping[str, str], optimizer: bool) -> dict[str, Any]:
    """Model (``name``) or flattened optimizer (``state.{name}.{what}``) entries with each ``name`` of
    ``names`` replaced by its mapped key; others as they are."""
    if not names:
        return state
    out: dict[str, Any] = {}
    for key, value in state.items():
        if optimizer and key.startswith("state."):
            name, _, what = key.removeprefix("state.").rpartition(".")
            key = f"state.{names[name]}.{what}" if name in names else key
        else:
            key = names.get(key, key) if not optimizer else key
        out[key] = value
    return out


@dataclass(frozen=True)
class LoadOptions:
    """What a load restores besides the weights: the optimizer's state, the scheduler's, and the rest of
    the training state (step and samples counters, fp16 loss scale, RNG); ``deepspeed`` reads DeepSpeed's
    ``load_checkpoint`` keywords."""

    optimizer: bool = True
    scheduler: bool = True
    training_state: bool = True

    @classmethod
    def deepspeed(
        cls,
        load_module_strict: bool = True,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = True,
        load_module_only: bool = False,
        custom_load_fn: Any = None,
    ) -> LoadOptions:
        """DeepSpeed's meaning: ``load_module_only`` the weights alone (a warm start: step 0, a fresh
        optimizer and schedule); ``load_optimizer_states=False`` / ``load_lr_scheduler_states=False`` leave
        that one fresh and restore the rest. Refused by name: what this engine cannot do."""
        if not load_module_strict:
            raise ValueError(
                "load_checkpoint(load_module_strict=False) is not supported: a checkpoint must hold every "
                "weight of this model (a missing one is refused, naming it); load it with the default True"
            )
        if custom_load_fn is not None:
            raise ValueError(
                "load_checkpoint(custom_load_fn=...) is not supported: the weights load by their names into "
                "this rank's layers; load with custom_load_fn=None, then change the module as you need"
            )
        if load_module_only:
            return cls(optimizer=False, scheduler=False, training_state=False)
        return cls(optimizer=bool(load_optimizer_states), scheduler=bool(load_lr_scheduler_states))


def check_save_arguments(save_latest: bool, exclude_frozen_parameters: bool, keep: int | None) -> None:
    """DeepSpeed's ``save_checkpoint`` arguments past ``client_state``, where this engine cannot honour
    them, and ``keep``, which is a count: 0 kept every checkpoint and -1 deleted the oldest one only."""
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(
            f"save_checkpoint keep={keep!r}: use a count >= 1 (the newest step-N checkpoints kept), or None "
            "to keep every one"
        )
    if not save_latest:
        raise ValueError(
            "save_checkpoint(save_latest=False) is not supported: every checkpoint is committed by pointing "
            "`latest` at it (a directory `latest` does not name never counts); save with save_latest=True"
        )
    if exclude_frozen_parameters:
        raise ValueError(
            "save_checkpoint(exclude_frozen_parameters=True) is not supported: a load refuses a checkpoint "
            "without every weight of the model; save with exclude_frozen_parameters=False"
        )


def _state_dict(
    parts: TrainParts, counters: dict[str, Any], client_state: Any, optimizer: bool = True
) -> dict[str, Any]:
    """``optimizer`` False: no optimizer entries (building them gives a fresh optimizer a first step's
    state, which a load that leaves the optimizer alone must not)."""
    trainer = {
        **counters,
        "scheduler": parts.scheduler.state_dict() if parts.scheduler is not None else None,
        "client_state": client_state,
        "layout": parts.layout,
    }
    return {
        "model": _rename(parts.model.state_dict(), parts.shard_keys, optimizer=False),
        "optimizer": _rename(
            get_optimizer_state_dict(parts.model, parts.optimizer, options=_OPTIM), parts.shard_keys, True
        )
        if optimizer
        else {},
        # non-tensor leaves are pickled by DCP; one blob keeps their structure whole
        "trainer": pickle.dumps(trainer),
        f"rng_rank{_rank()}": _rng_state(),
    }


def _gathered(value: Any) -> list[Any]:
    """Every rank's ``value`` (just this one's without a process group)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _agreed_name(name: str) -> str:
    """``name`` once every rank has passed the same one and the commit protocol can publish it; checked
    after gathering every rank's, so all of them raise the same error instead of some waiting."""
    # why: ranks with different tags would each write their own directory and rank 0 commit its own
    names = set(_gathered(name))
    if len(names) > 1:
        raise ValueError(
            f"save_checkpoint tag differs between ranks ({', '.join(sorted(map(repr, names)))}): pass "
            "the same tag on every rank (derive it from the step, not from a clock or the rank)"
        )
    problem = commit_protocol.name_problem(name)
    if problem:
        raise ValueError(f"save_checkpoint tag {name!r}: {problem}; use a plain name such as 'step-100'")
    return name


def _hold_lock(root: Path, job: str) -> None:
    """The committing rank holds ``root``'s lock from its first save on (checkpoint_lock.py), or every
    rank raises its refusal: another process saves there."""
    refusal = ""
    if _is_writer():
        try:
            checkpoint_lock.hold(
                root,
                job=job,
                field="save_checkpoint save_dir",
                fix="save into a directory of this run's own (another save_dir)",
            )
        except CheckpointError as err:
            refusal = str(err)
    # why: a committing rank refused alone would leave the others waiting in DCP's collectives
    refused = next((why for why in _gathered(refusal) if why), "")
    if refused:
        raise CheckpointError(refused)


def save(engine: TrainState, root: Path, tag: str | None, client_state: Any, keep: int | None) -> Path:
    started = time.perf_counter()
    counters = engine.counters()
    step = counters["step"]
    name = _agreed_name(tag or commit_protocol.step_name(step))
    _hold_lock(root, engine.job)
    tmp = commit_protocol.prepare(root, name, _is_writer(), _barrier)
    with _quiet():
        dcp.save(_state_dict(engine.train_parts(), counters, client_state), checkpoint_id=tmp)
    committed = commit_protocol.commit(root, name, keep, _is_writer(), _barrier)
    seconds = time.perf_counter() - started
    metrics.CHECKPOINT_SECONDS.labels(engine.job).observe(seconds)
    metrics.LAST_CHECKPOINT_STEP.labels(engine.job).set(step)
    metrics.LAST_CHECKPOINT_TIME.labels(engine.job).set(committed.time)
    if _rank() == 0:
        log.info(
            "checkpoint committed",
            extra={"path": str(committed.path), "step": step, "seconds": round(seconds, 3)},
        )
    return committed.path


def _log_schedule_changes(scheduler: Any, saved: dict[str, Any], step: int) -> None:
    """One line, when this run's config sets the schedule otherwise than the checkpoint's run did: which
    settings the resumed run uses (the config's, at the saved position, as DeepSpeed's resume does)."""
    if _rank() != 0 or not isinstance(scheduler, DeepSpeedSchedule):
        return
    changed = scheduler.changed_settings(saved)
    if changed:
        log.info(
            f"the learning-rate schedule resumes at step {step} with this run's settings, as DeepSpeed's "
            "does (a checkpoint holds only its position): "
            + ", ".join(f"{name} {now!r} (saved: {was!r})" for name, (was, now) in changed.items()),
        )


def load(
    engine: TrainState, root: Path, tag: str | None, options: LoadOptions = LoadOptions()
) -> tuple[Path | None, Any]:
    if tag is None:
        committed, skipped = commit_protocol.resume_point_skipping(root)
        if _rank() == 0:  # every rank decides the same; one says so, records it and reports it
            if committed is not None and skipped:
                log.warning(commit_protocol.describe_skips(root, committed, skipped))
            entries = skipped_checkpoints.record(root, skipped, committed.name if committed else None)
            skipped_checkpoints.publish(engine.job, entries)
        if committed is None:
            return None, None
        path = committed.path
    else:
        path = root / tag
        problem = commit_protocol.verify(path)
        if problem:
            raise CheckpointError(f"checkpoint {tag!r} in {root} is not complete: {problem}")
    try:
        saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as err:  # DCP's reader raises many kinds; the checkpoint is what matters
        raise CheckpointError(f"checkpoint {path} does not load: {_first_line(err)}") from None
    parts = engine.train_parts()
    state = _state_dict(parts, engine.counters(), None, optimizer=options.optimizer)
    tensor_parallel = parts.layout[2]
    # saved with another tensorParallel: the saved shards this rank's part overlaps, under their keys
    pending = reshard.plan(
        state, saved, parts.shard_layouts, parts.shard_keys, parts.tp_rank, tensor_parallel
    )
    missing = sorted(f"model.{k}" for k in state["model"] if f"model.{k}" not in saved)
    if missing:
        raise CheckpointError(
            f"checkpoint {path} has no weights for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}: "
            "it was saved from a different model (layer list)"
        )
    rng_key = f"rng_rank{_rank()}"
    if rng_key not in saved or not options.training_state:
        state.pop(rng_key)
    # partial: other ranks' RNG entries and (with fewer stages now) other stages' layers stay unread
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
    except (Exception, CheckpointException) as err:  # a shard damaged at its size (a BaseException: DCP's)
        raise CheckpointError(f"checkpoint {path} does not load: {_first_line(err)}") from None
    reshard.finish(pending)
    back = {key: name for name, key in parts.shard_keys.items()}
    parts.model.load_state_dict(_rename(state["model"], back, optimizer=False))
    if options.optimizer:
        optimizer_state = _rename(state["optimizer"], back, optimizer=True)
        set_optimizer_state_dict(parts.model, parts.optimizer, optimizer_state, options=_OPTIM)
    trainer = pickle.loads(state["trainer"])
    if options.scheduler and parts.scheduler is not None and trainer["scheduler"] is not None:
        _log_schedule_changes(parts.scheduler, trainer["scheduler"], trainer["step"])
        parts.scheduler.load_state_dict(trainer["scheduler"])
    one_of_them = options.optimizer != options.scheduler
    if one_of_them and isinstance(parts.scheduler, torch.optim.lr_scheduler.LRScheduler):
        # the rate lives in the optimizer's groups, which a scheduler's state does not write (nor a fresh
        # scheduler the saved optimizer's): the next step runs at the schedule's rate, loaded or fresh
        for group, lr in zip(parts.optimizer.param_groups, parts.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
    if options.training_state:
        engine.restore_counters(
            {k: v for k, v in trainer.items() if k not in ("scheduler", "client_state", "layout")}
        )
    if tuple(trainer["layout"]) == parts.layout and rng_key in state:
        rng = pickle.loads(state[rng_key])
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    if options.training_state:  # (a warm start's weights are another run's checkpoint, not this run's)
        metrics.LAST_CHECKPOINT_STEP.labels(engine.job).set(trainer["step"])
    if _rank() == 0:
        log.info(
            "checkpoint loaded",
            extra={
                "path": str(path),
                "step": trainer["step"],
                "saved_layout": list(trainer["layout"]),
                "loaded": ["weights"]
                + [part for part in ("optimizer", "scheduler", "training_state") if getattr(options, part)],
            },
        )
    return path, trainer["client_state"]


class CheckpointMethods:
    """``save_checkpoint`` and ``load_checkpoint`` as DeepSpeed's engines offer them, for both of ours
    (the pipeline engine and the data-parallel one): what they save and restore is ``TrainState``."""

    def save_checkpoint(
        self,
        save_dir: str | Path,
        tag: str | None = None,
        client_state: Any = None,
        save_latest: bool = True,
        exclude_frozen_parameters: bool = False,
        *,
        keep: int | None = None,
    ) -> Path:
        """Write and commit a checkpoint of model, optimizer, scheduler, step and RNG (see this module);
        DeepSpeed's arguments in DeepSpeed's order, then ``keep``: the newest ``keep`` step-N directories
        stay (None: all)."""
        check_save_arguments(save_latest, exclude_frozen_parameters, keep)
        return save(cast(TrainState, self), Path(save_dir), tag, client_state, keep)

    def load_checkpoint(
        self,
        load_dir: str | Path,
        tag: str | None = None,
        load_module_strict: bool = True,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = True,
        load_module_only: bool = False,
        custom_load_fn: Any = None,
    ) -> tuple[Path | None, Any]:
        """Resume from ``tag`` or the committed ``latest``; returns (path, client_state), (None, None) if none.
        DeepSpeed's keywords, as it means them (``LoadOptions.deepspeed``)."""
        options = LoadOptions.deepspeed(
            load_module_strict,
            load_optimizer_states,
            load_lr_scheduler_states,
            load_module_only,
            custom_load_fn,
        )
        return load(cast(TrainState, self), Path(load_dir), tag, options)
