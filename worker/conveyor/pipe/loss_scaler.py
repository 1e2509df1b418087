"""fp16 loss scaling as DeepSpeed's: ``DynamicLossScaler`` (deepspeed/runtime/fp16/loss_scaler.py) for
``loss_scale: 0``, a fixed scale for ``loss_scale > 0``.

DeepSpeed's dynamic rules, followed step for step (``update``): an overflowing step is skipped; it lowers
the scale (halved, not below ``min_loss_scale``) only once ``hysteresis`` overflows have used up the
hysteresis (each earlier one takes one off it; at 1 every overflow halves), and an overflow at
``min_loss_scale`` with no hysteresis left stops the run. A step without overflow refills the hysteresis
when ``consecutive_hysteresis``; the scale doubles on a good step whose distance from the last overflow
(``cur_iter - last_overflow_iter - 1``, where "no overflow yet" is iteration -1) is a positive multiple of
``loss_scale_window``, refilling the hysteresis then too. So the first doubling comes on the
``window + 1``-th good step of a run or after an overflow, the next ones every ``window`` steps.

A checkpoint holds the whole scaler, its settings with its state, and a resume takes it whole, as
DeepSpeed's ZeRO optimizers (which pickle the scaler object) do: a config changed across a restart does
not change the resumed run's scaling, and ``restore`` says which settings it kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from conveyor.pipe.config import PrecisionConfig

SCALE_FACTOR = 2.0  # DeepSpeed's scale_factor; not a config key there


class LossScaleError(RuntimeError):
    """An overflow at the smallest scale: the gradients are not finite at any scale DeepSpeed would try."""


@dataclass(frozen=True)
class ScalerSettings:
    """The config keys a scaler runs by (DeepSpeed's names); ``loss_scale`` > 0 is a fixed scale."""

    loss_scale: float
    initial_scale_power: int
    loss_scale_window: int
    hysteresis: int
    consecutive_hysteresis: bool
    min_loss_scale: float

    @classmethod
    def of(cls, config: PrecisionConfig) -> ScalerSettings:
        return cls(
            config.loss_scale,
            config.initial_scale_power,
            config.loss_scale_window,
            config.hysteresis,
            config.consecutive_hysteresis,
            config.min_loss_scale,
        )

    @property
    def dynamic(self) -> bool:
        return not self.loss_scale


class LossScaler:
    """The scale of the next step's loss (``cur_scale``) and the state that decides the one after."""

    def __init__(self, config: PrecisionConfig):
        self.settings = ScalerSettings.of(config)
        s = self.settings
        self.cur_scale = float(2**s.initial_scale_power if s.dynamic else s.loss_scale)
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self.cur_hysteresis = s.hysteresis

    def update(self, overflow: bool) -> None:
        """After a step (every rank alike: ``overflow`` is agreed over all of them); DeepSpeed's
        ``DynamicLossScaler.update_scale``, a fixed scale staying as it is."""
        s = self.settings
        if not s.dynamic:
            return
        if overflow:
            if s.hysteresis == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == s.min_loss_scale:
                    raise LossScaleError(
                        f"fp16 step {self.cur_iter} overflowed at the smallest loss scale (fp16.min_loss_scale "
                        f"{s.min_loss_scale:g}): the gradients are inf/NaN however small the scale, so the run "
                        "stops, as DeepSpeed's does; lower the learning rate or fp16.min_loss_scale, or train "
                        "in bf16"
                    )
                self.cur_scale = max(self.cur_scale / SCALE_FACTOR, s.min_loss_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if s.consecutive_hysteresis:
                self.cur_hysteresis = s.hysteresis
            stable_interval = self.cur_iter - self.last_overflow_iter - 1
            if stable_interval > 0 and stable_interval % s.loss_scale_window == 0:
                if not s.consecutive_hysteresis:
                    self.cur_hysteresis = s.hysteresis
                self.cur_scale *= SCALE_FACTOR
        self.cur_iter += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "cur_scale": self.cur_scale,
            "cur_iter": self.cur_iter,
            "last_overflow_iter": self.last_overflow_iter,
            "cur_hysteresis": self.cur_hysteresis,
        }

    def restore(self, state: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Take a saved scaler whole; returns the settings it kept that this run's config sets otherwise,
        as {key: (kept, configured)}."""
        saved = ScalerSettings(**state["settings"])
        changed = {
            key: (value, getattr(self.settings, key))
            for key, value in asdict(saved).items()
            if value != getattr(self.settings, key)
        }
        self.settings = saved
        self.cur_scale = float(state["cur_scale"])
        self.cur_iter = int(state["cur_iter"])
        self.last_overflow_iter = int(state["last_overflow_iter"])
        self.cur_hysteresis = int(state["cur_hysteresis"])
        return changed

    def restore_legacy(self, loss_scale: float, good_steps: int, step: int) -> None:
        """A checkpoint of an older release: its scale and the good steps since its last overflow (which
        place that overflow); the hysteresis full, as its scaler had none."""
        self.cur_scale = float(loss_scale)
        self.cur_iter = step
        self.last_overflow_iter = step - good_steps - 1
        self.cur_hysteresis = self.settings.hysteresis
