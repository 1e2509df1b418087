"""fp16 loss scaling in the engine (one process): DeepSpeed's scale sequence and skipped steps for a
pattern of overflows (the rules: test_loss_scaler.py), and the scaler's state across a checkpoint."""

from __future__ import annotations

import math

import conveyor
import pytest
import torch
from conveyor.pipe import PipelineModule

from tests.worker.pipe.models import config, lm_loss, make_data, tied_layers

STEPS, SAVE_AT = 6, 3
FP16 = {"enabled": True, "loss_scale_window": 2, "initial_scale_power": 4}


def _train(ckpt, resume: bool) -> list[tuple[int, float, float]]:
    """(step, loss, loss scale after the step) of each step run; saves after SAVE_AT steps."""
    net = PipelineModule(tied_layers(), loss_fn=lm_loss)
    engine, _, _, _ = conveyor.initialize(model=net, config=config(2, 1, fp16=FP16))
    if resume:
        assert engine.load_checkpoint(ckpt)[0] is not None
    data, seen = make_data(STEPS, 2), []
    while engine.global_steps < STEPS:
        step = engine.global_steps
        seen.append((step, float(engine.train_batch(iter(data[step]))), engine.loss_scale))
        if not resume and engine.global_steps == SAVE_AT:
            engine.save_checkpoint(ckpt)
    return seen


def test_a_resumed_run_keeps_the_loss_scale_schedule(tmp_path):
    # The count of good steps toward the next doubling was not saved: a resumed run doubled the scale
    # loss_scale_window steps after the resume instead of where the uninterrupted run did
    uninterrupted = _train(tmp_path, resume=False)
    assert len({scale for _, _, scale in uninterrupted}) > 2  # the scale grows over the run
    assert _train(tmp_path, resume=True) == uninterrupted[SAVE_AT:]


class _Poison:
    """A loss made infinite on the steps an overflow pattern marks "O": the gradients overflow."""

    def __init__(self, pattern: str):
        self.pattern, self.step = pattern, 0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = lm_loss(logits, labels)
        return loss * math.inf if self.pattern[self.step] == "O" else loss


def _overflow_run(
    pattern: str, fp16: dict, ckpt=None, save_at: int | None = None, resume: bool = False
) -> tuple[list[float], list[bool]]:
    """(the scale each step ran at, then the last one; whether each step changed the weights)."""
    poison = _Poison(pattern)
    engine, _, _, _ = conveyor.initialize(
        model=PipelineModule(tied_layers(), loss_fn=poison),
        config=config(2, 1, fp16={"enabled": True, **fp16}),
    )
    if resume:
        assert engine.load_checkpoint(ckpt)[0] is not None
    data, scales, stepped = make_data(len(pattern), 2), [], []
    while engine.global_steps < len(pattern):
        poison.step = engine.global_steps
        before = [p.detach().clone() for p in engine.module.parameters()]
        scales.append(engine.loss_scale)
        engine.train_batch(iter(data[engine.global_steps]))
        stepped.append(any(not torch.equal(a, p) for a, p in zip(before, engine.module.parameters())))
        if engine.global_steps == save_at and not resume:
            engine.save_checkpoint(ckpt)
    assert engine.skipped_steps == pattern.count("O")  # (a resumed run's count goes on from the checkpoint's)
    return [*scales, engine.loss_scale], stepped


@pytest.mark.parametrize(
    ("fp16", "expected"),
    [
        # test_loss_scaler.py's hand-derived sequences for "OGOGGGOO": hysteresis 2, not consecutive: the
        # second overflow halves (1 G between does not refill); consecutive: it does not
        ({"hysteresis": 2}, [16, 16, 16, 8, 8, 8, 16, 16, 8]),
        ({"hysteresis": 2, "consecutive_hysteresis": True}, [16, 16, 16, 16, 16, 16, 32, 32, 16]),
        ({"loss_scale": 64}, [64] * 9),  # a fixed scale: overflows still skipped
    ],
)
def test_the_engine_scales_and_skips_as_deepspeed(fp16, expected):
    # The engine halved on every overflow (no hysteresis: DeepSpeed's key was refused as unknown) and
    # doubled after loss_scale_window good steps, one before DeepSpeed does
    pattern = "OGOGGGOO"
    scales, stepped = _overflow_run(pattern, {"initial_scale_power": 4, "loss_scale_window": 2, **fp16})
    assert scales == expected
    assert stepped == [step == "G" for step in pattern]  # exactly the overflowing steps are skipped


@pytest.mark.parametrize("consecutive", [False, True])
def test_a_resume_between_overflows_continues_the_sequence(tmp_path, consecutive):
    pattern, keys = (
        "OGOGGGOO",
        {"initial_scale_power": 4, "loss_scale_window": 2, "consecutive_hysteresis": consecutive},
    )
    whole, _ = _overflow_run(pattern, keys)
    # after O G: the hysteresis left (1: not consecutive, the next overflow halves) and the last overflow's
    # step (where the window counts from) are the checkpoint's
    head, _ = _overflow_run(pattern, keys, tmp_path, save_at=2)
    assert head == whole
    resumed, _ = _overflow_run(pattern, keys, tmp_path, save_at=2, resume=True)
    assert resumed == whole[2:]


def test_an_older_releases_checkpoint_resumes_its_scale():
    """Older checkpoints saved the scale and the good steps since the last overflow, not the scaler."""
    engine, _, _, _ = conveyor.initialize(
        model=PipelineModule(tied_layers(), loss_fn=lm_loss), config=config(2, 1, fp16=FP16)
    )
    engine.restore_counters(
        {"step": 5, "samples": 20, "loss_scale": 64.0, "good_steps": 1, "skipped_steps": 2}
    )
    assert (engine.loss_scale, engine.skipped_steps) == (64.0, 2)
    # its last overflow was step 3 (1 good step since): stable_interval 1 at step 5, 2 at step 6 -> 128
    engine.loss_scaler.update(False)
    assert engine.loss_scale == 64.0
    engine.loss_scaler.update(False)
    assert engine.loss_scale == 128.0
