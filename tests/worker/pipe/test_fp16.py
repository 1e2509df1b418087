"""fp16 dynamic loss scaling (one process): the scale's schedule survives a checkpoint."""

from __future__ import annotations

import conveyor
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
