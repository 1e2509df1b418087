"""Pipeline (and data) parallel training equals plain single-process training of the unsplit model:
per-step losses and every final weight within fp32 tolerance, for both schedules, a tied
embedding/output layer, a tuple (hidden, mask, flag) boundary and global-norm gradient clipping."""

from __future__ import annotations

import conveyor
import pytest
import torch
from conveyor.pipe import PipelineModule

from tests.worker.pipe.harness import run_ranks
from tests.worker.pipe.models import MODELS, config, lm_loss, make_data, reference_run

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
    """Runs on every rank (or alone): one engine per case; returns (losses, stage weights, last norm)."""
    results = []
    for model, schedule, clip in cases:
        net = PipelineModule(MODELS[model](), num_stages=stages, loss_fn=lm_loss)
        dp = net.topology.layout.replicas
        engine, _, _, _ = conveyor.initialize(model=net, config=config(micro_batches, dp, schedule, clip))
        data = make_data(steps, micro_batches * dp)
        replica = engine.topology.replica
        losses = []
        for step in data:
            mine = step[replica * micro_batches : (replica + 1) * micro_batches]
            feeds = engine.is_first_stage() or engine.is_last_stage()
            losses.append(float(engine.train_batch(iter(mine) if feeds else None)))
        weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
        results.append((losses, weights, engine.last_grad_norm))
    return results


def _rank_main(rank: int, world: int, stages: int, cases, steps=STEPS, micro_batches=MICRO_BATCHES):
    return train(stages, cases, steps, micro_batches)


def check(per_rank, cases, dp: int, steps=STEPS, micro_batches=MICRO_BATCHES, tol=1e-5):
    for case_index, (model, schedule, clip) in enumerate(cases):
        cfg = config(micro_batches, dp, schedule, clip)
        ref_losses, ref_weights, ref_norms = reference_run(model, cfg, make_data(steps, micro_batches * dp))
        if clip:
            assert min(ref_norms) > clip, "the clipping cases must actually clip"
        seen: set[str] = set()
        for rank, results in enumerate(per_rank):
            losses, weights, norm = results[case_index]
            where = f"{model}/{schedule}/clip={clip} rank {rank}"
            assert losses == pytest.approx(ref_losses, rel=tol, abs=tol), where
            for name, value in weights.items():
                torch.testing.assert_close(
                    value, ref_weights[name], rtol=tol, atol=tol, msg=f"{where}: {name}"
                )
            seen |= set(weights)
            if clip:
                assert norm == pytest.approx(ref_norms[-1], rel=1e-4), where
        assert seen == set(ref_weights), f"weights no stage holds: {set(ref_weights) - seen}"


def test_one_stage_without_a_process_group_matches_reference():
    check([train(1, CASES)], CASES, dp=1)


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stages,dp", [(2, 1), (4, 1), (2, 2)])
def test_pipeline_and_data_parallel_match_reference(stages, dp):
    per_rank = run_ranks(_rank_main, stages * dp, stages, CASES)
    check(per_rank, CASES, dp)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_bf16_hidden_int_mask_bool_flag_across_three_stages():
    # Mixed dtypes at every boundary with 3 stages: the receiver must allocate each tensor's own dtype.
    cases = [("tuple_bf16", "1f1b", CLIP), ("tuple_bf16", "gpipe", 0.0)]
    per_rank = run_ranks(_rank_main, 3, 3, cases, 3, 3)
    check(per_rank, cases, dp=1, micro_batches=3, tol=1e-3)
