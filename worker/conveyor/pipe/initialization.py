"""``conveyor.initialize``: DeepSpeed's entry point, which picks the engine for the model it is given."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from conveyor.pipe.config import ConfigError, EngineConfig, load_config
from conveyor.pipe.data_parallel_engine import DataParallelEngine
from conveyor.pipe.engine import PipelineEngine
from conveyor.pipe.module import PipelineModule


def initialize(
    args: Any = None,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    model_parameters: Iterable[Any] | None = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    config: EngineConfig | dict[str, Any] | str | Path | None = None,
    config_params: dict[str, Any] | None = None,
    collate_fn: Any = None,
    job: str | None = None,
    dist_init_required: bool | None = None,
) -> tuple[Any, torch.optim.Optimizer, Any, Any]:
    """DeepSpeed's ``initialize``: (engine, optimizer, training_dataloader, lr_scheduler). A
    ``PipelineModule`` gets the pipeline engine (``train_batch``); any other module the data-parallel
    engine (``engine(x)``, ``engine.backward(loss)``, ``engine.step()``). As DeepSpeed does, it joins
    the process group itself when the launcher's RANK/WORLD_SIZE are set and none exists yet (or when
    ``dist_init_required``)."""
    joined = dist.is_available() and dist.is_initialized()
    if not joined and (dist_init_required or (dist_init_required is None and "WORLD_SIZE" in os.environ)):
        from conveyor.distributed import init_distributed

        init_distributed()
    if model is None:
        raise ValueError("conveyor.initialize needs model= (an nn.Module, or a conveyor.pipe.PipelineModule)")
    config = config if config is not None else config_params
    # --deepscale_config is DeepSpeed's deprecated name, still accepted by add_config_arguments
    from_args = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if from_args is not None and config is not None:
        # as DeepSpeed does: which of two configs was meant is not ours to guess
        raise ConfigError(
            f"a config came both as --deepspeed_config {from_args} and config=: give one of them"
        )
    config = config if config is not None else from_args
    engine_type: Any = PipelineEngine if isinstance(model, PipelineModule) else DataParallelEngine
    engine = engine_type(
        model,
        load_config(config),
        optimizer=optimizer,
        model_parameters=model_parameters,
        lr_scheduler=lr_scheduler,
        training_data=training_data,
        collate_fn=collate_fn,
        job=job,
    )
    engine.local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # as DeepSpeed's engine reads it
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler
