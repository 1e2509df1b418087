"""What each rank runs in the multi-process tests (imported by spawned processes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import conveyor
from conveyor.pipe import PipelineModule

from tests.worker.pipe.models import MODELS, config, lm_loss, make_data

STEPS, MICRO_BATCHES, CLIP = 3, 4, 0.3
CASES = [
    (model, schedule, clip)
    for model in ("tied", "tuple")
    for schedule in ("1f1b", "gpipe")
    for clip in (0.0, CLIP)
]


def train(
    stages: int, cases: list[tuple[str, str, float]], steps: int = STEPS, micro_batches: int = MICRO_BATCHES
):
    """One engine per case on this rank (or alone); returns [(losses, this stage's weights, last norm)]."""
    results = []
    for model, schedule, clip in cases:
        net = PipelineModule(MODELS[model](), num_stages=stages, loss_fn=lm_loss)
        dp = net.topology.layout.replicas
        engine, _, _, _ = conveyor.initialize(model=net, config=config(micro_batches, dp, schedule, clip))
        losses = [
            float(engine.train_batch(_feed(engine, step, micro_batches)))
            for step in make_data(steps, micro_batches * dp)
        ]
        weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
        results.append((losses, weights, engine.last_grad_norm))
    return results


def _feed(engine: Any, step: list[Any], micro_batches: int) -> Any:
    """This replica's share of a step's micro-batches, on the stages that read data."""
    if not (engine.is_first_stage() or engine.is_last_stage()):
        return None
    replica = engine.topology.replica
    return iter(step[replica * micro_batches : (replica + 1) * micro_batches])


RESUME_STEPS, RESUME_AT, GLOBAL_MICRO_BATCHES = 4, 2, 4


def resume_config(dp: int) -> dict[str, Any]:
    cfg = config(GLOBAL_MICRO_BATCHES // dp, dp, "1f1b", CLIP)
    cfg["scheduler"] = {
        "type": "WarmupLR",
        "params": {"warmup_max_lr": 0.05, "warmup_num_steps": 3, "warmup_type": "linear"},
    }
    return cfg


def train_resumable(stages: int, ckpt: Path, start: int | None, save_at: int | None = None):
    """Train the tied model to RESUME_STEPS with a global batch of 4 micro-batches (split over the
    replicas), resuming from ``ckpt`` when ``start`` is given. Returns (losses by step, weights)."""
    net = PipelineModule(MODELS["tied"](), num_stages=stages, loss_fn=lm_loss)
    dp = net.topology.layout.replicas
    engine, _, _, _ = conveyor.initialize(model=net, config=resume_config(dp))
    if start is not None:
        path, client = engine.load_checkpoint(ckpt)
        assert path is not None and engine.global_steps == start and client == {"note": "resume"}, (
            path,
            client,
        )
    losses = {}
    data = make_data(RESUME_STEPS, GLOBAL_MICRO_BATCHES)
    while engine.global_steps < RESUME_STEPS:
        step = engine.global_steps
        losses[step] = float(engine.train_batch(_feed(engine, data[step], GLOBAL_MICRO_BATCHES // dp)))
        if save_at is not None and engine.global_steps == save_at:
            engine.save_checkpoint(ckpt, client_state={"note": "resume"})
    return losses, {k: v.detach().clone() for k, v in net.state_dict().items()}


def world_of_four(rank: int, world: int, ckpt: str) -> dict[str, Any]:
    """Everything that needs four ranks, in one process group: the (4, 1) and (2, 2) layouts against the
    reference, and a checkpoint saved at 2 stages x 2 replicas resumed at 4 stages x 1 replica."""
    return {
        "4x1": train(4, CASES),
        "2x2": train(2, CASES),
        "uninterrupted": train_resumable(2, Path(ckpt), None, save_at=RESUME_AT),
        "resumed_4_stages": train_resumable(4, Path(ckpt), RESUME_AT),
    }


def rank_main(rank: int, world: int, stages: int, cases, steps=STEPS, micro_batches=MICRO_BATCHES):
    return train(stages, cases, steps, micro_batches)
