"""The learning rate each optimizer step runs at, in both engines, against DeepSpeed's schedules driven as a
plain torch loop drives a scheduler (``optimizer.step(); scheduler.step()``), one process."""

from __future__ import annotations

import math
from typing import Any

import conveyor
import pytest
import torch
from conveyor.pipe import PipelineModule
from torch import nn

from tests.worker.pipe.models import config, lm_loss, make_data, tied_layers

STEPS, LR = 12, 0.05


class DeepSpeedWarmupLR:
    """DeepSpeed's WarmupLR, WarmupDecayLR (``total_num_steps``) and WarmupCosineLR (``cosine``), as
    deepspeed/runtime/lr_schedules.py (38327e0) computes them: built at ``last_batch_iteration`` -1, which
    writes the first step's learning rate, and stepped after each optimizer step, as its engine's
    ``_take_model_step`` does."""

    def __init__(self, optimizer: torch.optim.Optimizer, cosine: bool = False, **params: Any):
        self.optimizer, self.cosine, self.params = optimizer, cosine, params
        self.base = [group["lr"] for group in optimizer.param_groups]
        self.warmup = max(2, params.get("warmup_num_steps", 1000))
        self.last_batch_iteration = -1
        self._write()

    def _rise(self, step: int) -> float:
        if self.params.get("warmup_type", "log") == "log":
            return math.log(step + 1) / math.log(self.warmup)
        return step / self.warmup

    def lr(self, base: float) -> float:
        step = self.last_batch_iteration
        if self.cosine:
            low = self.params.get("warmup_min_ratio", 0.0)
            if step < 0:  # DeepSpeed: [0.0] "before it has started"
                return 0.0
            if step < self.warmup:
                return base * (low + (1 - low) * self._rise(step))
            total, floor = self.params["total_num_steps"], self.params.get("cos_min_ratio", 0.0001)
            cosine = (1 + math.cos(math.pi * (step - self.warmup + 1) / (total - self.warmup))) / 2
            return base * max(0.0, floor + (1 - floor) * cosine)
        low, high = self.params.get("warmup_min_lr", 0.0), self.params.get("warmup_max_lr", 0.001)
        if step < 0:  # DeepSpeed: min_lrs "before it has started"
            return low
        if step < self.warmup:
            gamma = self._rise(step)
        elif "total_num_steps" in self.params:
            total = self.params["total_num_steps"]
            gamma = max(0.0, (total - step) / max(1.0, total - self.warmup))
        else:
            gamma = 1.0
        return low + (high - low) * gamma

    def _write(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = self.lr(base)

    def step(self) -> None:
        self.last_batch_iteration += 1
        self._write()


def plain_loop(steps: int, make_scheduler: Any) -> list[float]:
    """The learning rate of each step of a plain torch loop: optimizer.step(); scheduler.step()."""
    weight = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=LR)
    scheduler = make_scheduler(optimizer)
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        weight.grad = torch.ones(1)
        optimizer.step()
        scheduler.step()
    return used


def engine_lrs(plain: bool, cfg: dict[str, Any], lr_scheduler: Any = None) -> list[float]:
    """The learning rate of each optimizer step the engine takes (read as the step runs)."""
    torch.manual_seed(0)
    cfg = {**cfg, "optimizer": {"type": "SGD", "params": {"lr": LR}}}
    net = nn.Sequential(nn.Linear(4, 1)) if plain else PipelineModule(tied_layers(), loss_fn=lm_loss)
    engine, optimizer, _, _ = conveyor.initialize(model=net, config=cfg, lr_scheduler=lr_scheduler)
    used: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, *_: used.append(opt.param_groups[0]["lr"]))
    data = make_data(STEPS, 2)
    for step in range(STEPS):
        if plain:
            for _ in range(2):
                engine.backward(engine(torch.ones(2, 4)).pow(2).mean())
                engine.step()
        else:
            engine.train_batch(iter(data[step]))
    return used


SCHEDULES = {
    "WarmupLR log": ("WarmupLR", {"warmup_min_lr": 0.001, "warmup_max_lr": 0.05, "warmup_num_steps": 5}),
    "WarmupLR linear": (
        "WarmupLR",
        {"warmup_max_lr": 0.05, "warmup_num_steps": 4, "warmup_type": "linear"},
    ),
    "WarmupDecayLR": (
        "WarmupDecayLR",
        {"warmup_max_lr": 0.05, "warmup_num_steps": 4, "total_num_steps": 10, "warmup_type": "linear"},
    ),
    "WarmupCosineLR": (
        "WarmupCosineLR",
        {"warmup_num_steps": 4, "total_num_steps": STEPS, "warmup_type": "linear", "cos_min_ratio": 0.1},
    ),
}


@pytest.mark.parametrize("plain", [False, True], ids=["pipeline", "data-parallel"])
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_each_step_runs_at_deepspeeds_learning_rate(name, plain):
    """DeepSpeed's schedules write their first rate at construction (iteration -1) and step after each
    optimizer step, so step k runs at the schedule's value for k - 1 (k >= 1); ours, torch schedulers,
    wrote the value for 0 at construction: every step ran one iteration ahead (a linear warm-up reached its
    peak a step early; the decay ended a step early)."""
    kind, params = SCHEDULES[name]
    cfg = {**config(2, 1), "scheduler": {"type": kind, "params": params}}
    if plain:
        cfg.pop("pipeline")
    expected = plain_loop(
        STEPS, lambda opt: DeepSpeedWarmupLR(opt, cosine=kind == "WarmupCosineLR", **params)
    )
    assert engine_lrs(plain, cfg) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_a_cosine_schedule_with_a_warmup_floor_starts_at_its_floor():
    """DeepSpeed's WarmupCosineLR gives its first group lr 0 on the first step (its rate before it has
    started is [0.0]), whatever warmup_min_ratio says; ours starts at warmup_min_ratio x lr, and from the
    second step on runs DeepSpeed's rates."""
    params = {
        "warmup_num_steps": 4,
        "total_num_steps": STEPS,
        "warmup_min_ratio": 0.2,
        "warmup_type": "linear",
    }
    cfg = {**config(2, 1), "scheduler": {"type": "WarmupCosineLR", "params": params}}
    expected = plain_loop(STEPS, lambda opt: DeepSpeedWarmupLR(opt, cosine=True, **params))
    used = engine_lrs(False, cfg)
    assert used[0] == pytest.approx(0.2 * LR) and expected[0] == 0.0
    assert used[1:] == pytest.approx(expected[1:], rel=1e-12)


@pytest.mark.parametrize("plain", [False, True], ids=["pipeline", "data-parallel"])
def test_a_client_scheduler_steps_as_in_a_plain_torch_loop(plain):
    def make(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))

    cfg = config(2, 1)
    if plain:
        cfg.pop("pipeline")
    assert engine_lrs(plain, cfg, lr_scheduler=make) == pytest.approx(plain_loop(STEPS, make), rel=1e-12)


RESUME_AT = 4
CHANGED = {  # a schedule's settings before and after a restart, its config changed
    "WarmupDecayLR": (
        {"warmup_max_lr": 0.05, "warmup_num_steps": 3, "total_num_steps": 8, "warmup_type": "linear"},
        {"warmup_max_lr": 0.08, "warmup_num_steps": 3, "total_num_steps": STEPS, "warmup_type": "linear"},
    ),
    "WarmupCosineLR": (
        {"warmup_num_steps": 3, "total_num_steps": 8, "warmup_type": "linear"},
        {"warmup_num_steps": 3, "total_num_steps": STEPS, "warmup_type": "linear", "cos_min_ratio": 0.2},
    ),
}


def _resumed_lrs(ckpt, kind: str, saved: dict, now: dict, lr: float = LR) -> list[float]:
    """The rate of each step of a run resumed at RESUME_AT with the schedule ``now`` from one saved there
    with ``saved``."""

    def engine(params: dict, optimizer_lr: float) -> Any:
        cfg = {**config(2, 1), "scheduler": {"type": kind, "params": params}}
        cfg["optimizer"] = {"type": "SGD", "params": {"lr": optimizer_lr}}
        return conveyor.initialize(model=PipelineModule(tied_layers(), loss_fn=lm_loss), config=cfg)[0]

    data = make_data(STEPS, 2)
    first = engine(saved, LR)
    for step in range(RESUME_AT):
        first.train_batch(iter(data[step]))
    first.save_checkpoint(ckpt)
    resumed = engine(now, lr)
    assert resumed.load_checkpoint(ckpt)[0] is not None
    used: list[float] = []
    resumed.optimizer.register_step_pre_hook(lambda opt, *_: used.append(opt.param_groups[0]["lr"]))
    for step in range(RESUME_AT, STEPS):
        resumed.train_batch(iter(data[step]))
    return used


@pytest.mark.parametrize("kind", sorted(CHANGED))
def test_a_resumed_run_follows_its_configs_schedule_from_the_saved_position(tmp_path, kind, caplog):
    # torch's load_state_dict put back the saved total_num_steps and peak: a run extended (or re-tuned) on
    # resume kept the old schedule, where DeepSpeed's checkpoint holds only last_batch_iteration
    import logging

    saved, now = CHANGED[kind]
    with caplog.at_level(logging.INFO, logger="conveyor.pipe.checkpoint"):
        used = _resumed_lrs(tmp_path, kind, saved, now)
    expected = plain_loop(STEPS, lambda opt: DeepSpeedWarmupLR(opt, cosine=kind == "WarmupCosineLR", **now))
    assert used == pytest.approx(expected[RESUME_AT:], rel=1e-12, abs=1e-15)
    said = [r.getMessage() for r in caplog.records if "learning-rate schedule resumes" in r.getMessage()]
    assert len(said) == 1, said
    assert f"resumes at step {RESUME_AT} with this run's settings" in said[0]
    assert f"total_num_steps {STEPS} (saved: 8)" in said[0]
    changed = (
        "warmup_max_lr 0.08 (saved: 0.05)" if kind == "WarmupDecayLR" else "cos_min_ratio 0.2 (saved: 0.0001)"
    )
    assert changed in said[0] and "warmup_num_steps" not in said[0]


def test_the_optimizers_rate_under_a_cosine_schedule_is_the_configs(tmp_path, caplog):
    """WarmupCosineLR scales the optimizer's lr; DeepSpeed's takes it from the optimizer at construction
    (its org_lrs, the config's), not from the checkpoint."""
    import logging

    params = CHANGED["WarmupCosineLR"][1]
    with caplog.at_level(logging.INFO, logger="conveyor.pipe.checkpoint"):
        used = _resumed_lrs(tmp_path, "WarmupCosineLR", params, params, lr=2 * LR)
    expected = plain_loop(STEPS, lambda opt: DeepSpeedWarmupLR(opt, cosine=True, **params))
    assert used == pytest.approx([2 * lr for lr in expected[RESUME_AT:]], rel=1e-12)
    assert f"optimizer lr [{2 * LR}] (saved: [{LR}])" in caplog.text


def test_an_unchanged_schedule_resumes_where_it_was_without_a_word(tmp_path, caplog):
    import logging

    params = CHANGED["WarmupDecayLR"][1]
    with caplog.at_level(logging.INFO, logger="conveyor.pipe.checkpoint"):
        used = _resumed_lrs(tmp_path, "WarmupDecayLR", params, params)
    assert used == pytest.approx(plain_loop(STEPS, lambda opt: DeepSpeedWarmupLR(opt, **params))[RESUME_AT:])
    assert "learning-rate schedule resumes" not in caplog.text
