"""The engine config: DeepSpeed's JSON keys, validated with messages that name the key and the fix.

Batch sizes follow DeepSpeed: ``train_batch_size = train_micro_batch_size_per_gpu x
gradient_accumulation_steps x data_parallel_size``; give any two (or one, the others default) and the
rest is derived, give all three and they must agree. In a pipeline, gradient_accumulation_steps is the
number of micro-batches per batch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    pass


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimizerConfig(_Section):
    type: str = Field(description="Adam, AdamW, SGD, Adagrad, RMSprop (case-insensitive)")
    params: dict[str, Any] = Field(default_factory=dict)


class SchedulerConfig(_Section):
    type: Literal["WarmupLR", "WarmupDecayLR", "WarmupCosineLR"]
    params: dict[str, Any] = Field(default_factory=dict)


class PrecisionConfig(_Section):
    enabled: bool = False
    # fp16 loss scaling (DeepSpeed's names and defaults; pipe/loss_scaler.py); ignored for bf16
    loss_scale: float = Field(0.0, ge=0.0, description="0 = dynamic, else this fixed scale")
    initial_scale_power: int = Field(16, ge=0, le=64)
    loss_scale_window: int = Field(1000, ge=1)
    hysteresis: int = Field(2, ge=1, description="overflows before the scale is lowered")
    consecutive_hysteresis: bool = False
    min_loss_scale: float = Field(1.0, gt=0.0)


class PipelineConfig(_Section):
    schedule: Literal["1f1b", "gpipe"] = "1f1b"

    @field_validator("schedule", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


class ZeroConfig(_Section):
    model_config = ConfigDict(extra="allow")
    stage: int = 0

    @field_validator("stage")
    @classmethod
    def _only_zero(cls, v: int) -> int:
        if v != 0:
            raise ValueError(
                f"ZeRO stage {v} is not supported with pipeline parallelism here: set stage 0 or remove it"
            )
        return v


class EngineConfig(_Section):
    train_batch_size: int | None = Field(None, ge=1)
    train_micro_batch_size_per_gpu: int | None = Field(None, ge=1)
    gradient_accumulation_steps: int | None = Field(None, ge=1)
    optimizer: OptimizerConfig | None = None
    scheduler: SchedulerConfig | None = None
    gradient_clipping: float = Field(0.0, ge=0.0, description="max global gradient norm; 0 = off")
    bf16: PrecisionConfig = Field(default_factory=lambda: PrecisionConfig.model_validate({}))
    fp16: PrecisionConfig = Field(default_factory=lambda: PrecisionConfig.model_validate({}))
    steps_per_print: int = Field(10, ge=1)
    pipeline: PipelineConfig = Field(default_factory=lambda: PipelineConfig.model_validate({}))
    zero_optimization: ZeroConfig | None = None
    wall_clock_breakdown: bool = False  # accepted for DeepSpeed configs; the engine always times steps

    def resolve_batch(self, data_parallel: int) -> tuple[int, int, int]:
        """(train_batch_size, micro_batch, micro-batches per batch) for ``data_parallel`` replicas."""
        tbs, mbs, gas = (
            self.train_batch_size,
            self.train_micro_batch_size_per_gpu,
            self.gradient_accumulation_steps,
        )
        if tbs is None and mbs is None:
            raise ConfigError("set train_batch_size or train_micro_batch_size_per_gpu in the config")
        if tbs is not None and mbs is not None and gas is not None:
            if tbs != mbs * gas * data_parallel:
                raise ConfigError(
                    f"inconsistent batch sizes: train_batch_size {tbs} != train_micro_batch_size_per_gpu {mbs} x "
                    f"gradient_accumulation_steps {gas} x data-parallel size {data_parallel} = "
                    f"{mbs * gas * data_parallel}: fix one of them or leave one out to have it derived"
                )
        elif tbs is not None and mbs is not None:
            gas, rest = divmod(tbs, mbs * data_parallel)
            if rest or gas == 0:
                raise ConfigError(
                    f"train_batch_size {tbs} is not a multiple of train_micro_batch_size_per_gpu {mbs} x "
                    f"data-parallel size {data_parallel}: change train_batch_size to a multiple of "
                    f"{mbs * data_parallel}"
                )
        elif tbs is not None:
            gas = gas or 1
            mbs, rest = divmod(tbs, gas * data_parallel)
            if rest or mbs == 0:
                raise ConfigError(
                    f"train_batch_size {tbs} is not divisible by gradient_accumulation_steps {gas} x "
                    f"data-parallel size {data_parallel}: make it a multiple of {gas * data_parallel}"
                )
        else:
            assert mbs is not None
            gas = gas or 1
        assert mbs is not None and gas is not None
        return mbs * gas * data_parallel, mbs, gas


def load_config(config: dict[str, Any] | str | Path | EngineConfig | None) -> EngineConfig:
    """Validate a config given as a dict, a JSON file path or an EngineConfig."""
    if isinstance(config, EngineConfig):
        return config
    if config is None:
        raise ConfigError(
            "conveyor.initialize needs config= (a dict or the path of a DeepSpeed-style JSON file)"
        )
    if isinstance(config, (str, Path)):
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read the config file {config}: {err}") from None
    try:
        parsed = EngineConfig.model_validate(config)
    except ValidationError as err:
        raise ConfigError("invalid engine config:\n" + _format(err)) from None
    if parsed.bf16.enabled and parsed.fp16.enabled:
        raise ConfigError("config.bf16.enabled and config.fp16.enabled are both true: enable at most one")
    return parsed


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = "config." + ".".join(str(part) for part in e["loc"])
        if e["type"] == "extra_forbidden":
            known = ", ".join(EngineConfig.model_fields) if len(e["loc"]) == 1 else "see docs/engine.md"
            lines.append(f"{where}: unknown key; remove it or fix its spelling (known keys: {known})")
        else:
            lines.append(f"{where}: {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})")
    return "\n".join(lines)


def add_config_arguments(parser: Any) -> Any:
    """DeepSpeed's ``add_config_arguments``: ``--deepspeed`` and ``--deepspeed_config PATH`` on an
    argparse parser (``initialize(args=args)`` reads the config from ``args.deepspeed_config``)."""
    group = parser.add_argument_group("conveyor", "DeepSpeed-style engine configuration")
    group.add_argument("--deepspeed", default=False, action="store_true", help="accepted, as DeepSpeed's")
    group.add_argument("--deepspeed_config", default=None, type=str, help="the engine config (JSON)")
    group.add_argument("--deepscale", default=False, action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--deepscale_config", default=None, type=str, help=argparse.SUPPRESS)
    return parser
