"""Optimizers and learning-rate schedules named in the config, as DeepSpeed names them."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from conveyor.pipe.config import ConfigError, OptimizerConfig, SchedulerConfig

_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
}


def trainable(model_parameters: Iterable[Any] | None, model: torch.nn.Module) -> list[Any]:
    """What the optimizer gets: ``model_parameters`` (parameters, or torch's param-group dicts as DeepSpeed
    takes them), else the model's parameters, without the frozen ones; groups left empty are dropped."""
    given = list(model_parameters) if model_parameters is not None else []
    if not given:
        given = list(model.parameters())
    if not any(isinstance(item, dict) for item in given):
        return [p for p in given if p.requires_grad]
    if not all(isinstance(item, dict) for item in given):
        raise TypeError("model_parameters mixes parameters and param-group dicts: give one kind")
    groups = []
    for group in given:
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if any(p.requires_grad for p in params):
            groups.append({**group, "params": [p for p in params if p.requires_grad]})
    return groups


def client_optimizer(optimizer: Any, params: list[Any]) -> Any:
    """The optimizer passed to ``initialize``: as DeepSpeed takes it, an optimizer or a callable that
    builds one from the parameters."""
    if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer(params)
    return optimizer


def client_scheduler(lr_scheduler: Any, optimizer: Any) -> Any:
    """The scheduler passed to ``initialize``: a scheduler, or (DeepSpeed's) a callable that builds one
    from the optimizer. Schedulers themselves are not callable."""
    return lr_scheduler(optimizer) if callable(lr_scheduler) else lr_scheduler


def build_optimizer(config: OptimizerConfig, params: Iterable[Any]) -> torch.optim.Optimizer:
    """The config's optimizer over ``params`` (parameters or param-group dicts, see ``trainable``)."""
    params = list(params)
    kind = config.type.lower()
    if kind not in _OPTIMIZERS:
        raise ConfigError(
            f"config.optimizer.type {config.type!r} is not supported: use one of "
            f"{', '.join(sorted(_OPTIMIZERS))}, or pass optimizer= to conveyor.initialize"
        )
    kwargs = dict(config.params)
    if kind in ("adam", "adamw"):
        # DeepSpeed's "Adam" decouples weight decay (AdamW) unless adam_w_mode is false; its "AdamW"
        # always does. Both are its FusedAdam, whose weight_decay defaults to 0 (torch's AdamW: 0.01).
        group_decays = [group.get("weight_decay", 0) for group in params if isinstance(group, dict)]
        if kwargs.pop("adam_w_mode", True) and any([kwargs.get("weight_decay", 0), *group_decays]):
            kind = "adamw"
        kwargs.pop("torch_adam", None)
        kwargs.setdefault("weight_decay", 0.0)
    if "betas" in kwargs:
        betas = kwargs["betas"]
        # YAML gives a list; a lone number or a string here would reach torch as a TypeError outside
        # the try below: a crash, restarted, instead of a refusal naming the field
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ConfigError(
                f"config.optimizer.params.betas {betas!r}: use a pair of coefficients, e.g. [0.9, 0.999]"
            )
        kwargs["betas"] = tuple(betas)
    try:
        return _OPTIMIZERS[kind](params, **kwargs)
    except (TypeError, ValueError) as err:  # an unknown or mistyped argument; a value out of range
        raise ConfigError(
            f"config.optimizer.params: {err} (parameters of torch.optim.{_OPTIMIZERS[kind].__name__})"
        ) from None


def _check_schedule(**values: Any) -> None:
    """Refuse schedule arguments out of range, naming the field: silently clamped (a negative warm-up)
    or passed through (a ratio above 1), they would train on a learning rate nobody asked for."""
    for name, value in values.items():
        if name.endswith("_ratio"):
            ok, fix = 0.0 <= value <= 1.0, "a ratio in [0, 1]"
        elif name.endswith("_lr"):
            ok, fix = value >= 0, "a learning rate >= 0"
        else:
            ok, fix = value is None or value >= 0, "a step count >= 0"
        if not ok:
            raise ConfigError(f"config.scheduler.params.{name} {value!r}: use {fix}")


def deepspeed_iteration(last_epoch: int) -> int:
    """The schedule's iteration that DeepSpeed's engine runs the optimizer step ``last_epoch`` at.
    DeepSpeed's schedules start at iteration -1 (writing the iteration-0 rate) and step after each
    optimizer step, so step k runs at iteration k - 1 and the first two steps at iteration 0. torch's
    LRScheduler counts from 0 at construction: read as is, every step ran one iteration ahead."""
    return max(0, last_epoch - 1)


class DeepSpeedSchedule(torch.optim.lr_scheduler.LRScheduler):
    """What a checkpoint restores of a schedule, as DeepSpeed's: its position alone. DeepSpeed's schedules'
    ``state_dict`` is ``{"last_batch_iteration": n}``, so a resumed run follows its config's settings from
    the saved step. torch's ``load_state_dict`` put back every attribute, the saved settings (a run's
    total_num_steps, its peak rate) over the config's. The state saved stays torch's (every attribute),
    which is how ``changed_settings`` can name what the config changed. ``SETTINGS``: DeepSpeed's param
    name -> the attribute holding it."""

    SETTINGS: dict[str, str] = {}

    def changed_settings(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """{param: (saved, this run's)} for each setting of the saved state this run's config changes."""
        return {
            name: (saved[attr], getattr(self, attr))
            for name, attr in self.SETTINGS.items()
            if attr in saved and saved[attr] != getattr(self, attr)
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch = state_dict["last_epoch"]
        self._step_count = state_dict.get("_step_count", self.last_epoch + 1)
        # why write the groups: the optimizer's saved groups hold the saved settings' rate (DeepSpeed's load
        # writes none, so its first resumed step runs at that one); here the config's settings apply from
        # the first resumed step on
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr


class WarmupLR(DeepSpeedSchedule):
    """DeepSpeed's WarmupLR (and WarmupDecayLR with ``total_num_steps``): the learning rate rises from
    ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps`` (log or linear), then stays, or
    decays linearly to 0 at ``total_num_steps``; step by step as DeepSpeed's (``deepspeed_iteration``)."""

    SETTINGS = {
        "warmup_min_lr": "min_lr",
        "warmup_max_lr": "max_lr",
        "warmup_num_steps": "warmup_num_steps",
        "warmup_type": "warmup_type",
        "total_num_steps": "total_num_steps",
    }

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_min_lr: float = 0.0,
        warmup_max_lr: float = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
        total_num_steps: int | None = None,
        last_epoch: int = -1,
    ):
        if warmup_type not in ("log", "linear"):
            raise ConfigError(f"config.scheduler.params.warmup_type {warmup_type!r}: use 'log' or 'linear'")
        _check_schedule(
            warmup_min_lr=warmup_min_lr,
            warmup_max_lr=warmup_max_lr,
            warmup_num_steps=warmup_num_steps,
            total_num_steps=total_num_steps,
        )
        if total_num_steps is not None and total_num_steps < warmup_num_steps:
            raise ConfigError(
                f"config.scheduler.params.total_num_steps {total_num_steps} < warmup_num_steps {warmup_num_steps}"
            )
        self.min_lr, self.max_lr = warmup_min_lr, warmup_max_lr
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.warmup_type, self.total_num_steps = warmup_type, total_num_steps
        super().__init__(optimizer, last_epoch)

    def _gamma(self, step: int) -> float:
        if step < self.warmup_num_steps:
            if self.warmup_type == "log":
                return math.log(step + 1) / math.log(self.warmup_num_steps)
            return step / self.warmup_num_steps
        if self.total_num_steps is None:
            return 1.0
        span = max(1, self.total_num_steps - self.warmup_num_steps)
        return max(0.0, (self.total_num_steps - step) / span)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        lr = self.min_lr + (self.max_lr - self.min_lr) * self._gamma(deepspeed_iteration(self.last_epoch))
        return [lr for _ in self.optimizer.param_groups]


class WarmupCosineLR(DeepSpeedSchedule):
    """DeepSpeed's WarmupCosineLR: each group's lr is its own (the optimizer's) lr x a ratio that rises
    from ``warmup_min_ratio`` to 1 over ``warmup_num_steps`` (log or linear), then follows a cosine down
    to ``cos_min_ratio`` at ``total_num_steps``; step by step as DeepSpeed's (``deepspeed_iteration``), but
    for the first step, which runs at ``warmup_min_ratio`` (DeepSpeed's gives its first group lr 0 there:
    its rate "before it has started"), and past ``total_num_steps``, where the ratio stays at
    ``cos_min_ratio`` (DeepSpeed's cosine climbs back up)."""

    SETTINGS = {
        "total_num_steps": "total_num_steps",
        "warmup_min_ratio": "warmup_min_ratio",
        "warmup_num_steps": "warmup_num_steps",
        "cos_min_ratio": "cos_min_ratio",
        "warmup_type": "warmup_type",
        "optimizer lr": "base_lrs",  # the ratio's base: DeepSpeed's org_lrs, the optimizer's at construction
    }

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_num_steps: int,
        warmup_min_ratio: float = 0.0,
        warmup_num_steps: int = 1000,
        cos_min_ratio: float = 0.0001,
        warmup_type: str = "log",
        last_epoch: int = -1,
    ):
        if warmup_type not in ("log", "linear"):
            raise ConfigError(f"config.scheduler.params.warmup_type {warmup_type!r}: use 'log' or 'linear'")
        _check_schedule(
            warmup_min_ratio=warmup_min_ratio,
            cos_min_ratio=cos_min_ratio,
            warmup_num_steps=warmup_num_steps,
            total_num_steps=total_num_steps,
        )
        if total_num_steps <= warmup_num_steps:
            raise ConfigError(
                f"config.scheduler.params.total_num_steps {total_num_steps} must exceed warmup_num_steps "
                f"{warmup_num_steps}"
            )
        self.total_num_steps, self.warmup_num_steps = total_num_steps, max(2, warmup_num_steps)
        self.warmup_min_ratio, self.cos_min_ratio, self.warmup_type = (
            warmup_min_ratio,
            cos_min_ratio,
            warmup_type,
        )
        super().__init__(optimizer, last_epoch)

    def ratio(self, step: int) -> float:
        if step < self.warmup_num_steps:
            if self.warmup_type == "log":
                rise = math.log(step + 1) / math.log(self.warmup_num_steps)
            else:
                rise = step / self.warmup_num_steps
            return self.warmup_min_ratio + (1.0 - self.warmup_min_ratio) * rise
        done = (step - self.warmup_num_steps + 1) / (self.total_num_steps - self.warmup_num_steps)
        cosine = (1 + math.cos(math.pi * min(1.0, done))) / 2
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        ratio = self.ratio(deepspeed_iteration(self.last_epoch))
        return [float(base) * ratio for base in self.base_lrs]


def build_scheduler(config: SchedulerConfig, optimizer: torch.optim.Optimizer) -> WarmupLR | WarmupCosineLR:
    params: dict[str, Any] = dict(config.params)
    if config.type in ("WarmupDecayLR", "WarmupCosineLR") and "total_num_steps" not in params:
        raise ConfigError(f"config.scheduler.params.total_num_steps is required for {config.type}")
    if config.type == "WarmupLR":
        params.pop("total_num_steps", None)
    try:
        if config.type == "WarmupCosineLR":
            return WarmupCosineLR(optimizer, **params)
        return WarmupLR(optimizer, **params)
    except TypeError as err:
        raise ConfigError(f"config.scheduler.params: {err}") from None
