"""Pipeline (and data) parallel training equals plain single-process training of the unsplit model (a
deep copy of an nn.Sequential built without conveyor.pipe): per-step losses and every final weight
within fp32 tolerance, for both schedules, a tied embedding/output layer, a tuple (hidden, mask, flag)
boundary and global-norm gradient clipping (clipped runs equal the reference for 1, 2 and 4 stages).
The reference's own losses are pinned by golden/loss_curves.txt (test_golden.py)."""

from __future__ import annotations

import pytest
import torch

from tests.worker.pipe.harness import run_ranks
from tests.worker.pipe.models import config, make_data, plain_name, reference_run
from tests.worker.pipe.scenarios import CASES, MICRO_BATCHES, STEPS, rank_main, train


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
                    value, ref_weights[plain_name(name)], rtol=tol, atol=tol, msg=f"{where}: {name}"
                )
            seen |= {plain_name(name) for name in weights}
            if clip:
                assert norm == pytest.approx(ref_norms[-1], rel=1e-4), where
        assert seen == set(ref_weights), f"weights no stage holds: {set(ref_weights) - seen}"


def test_one_stage_without_a_process_group_matches_reference():
    check([train(1, CASES)], CASES, dp=1)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_two_stages_match_reference():
    check(run_ranks(rank_main, 2, 2, CASES), CASES, dp=1)


@pytest.mark.integration
@pytest.mark.timeout(450)
@pytest.mark.parametrize("layout,dp", [("4x1", 1), ("2x2", 2)])
def test_four_ranks_match_reference(four_ranks, layout, dp):
    _, per_rank = four_ranks
    check([results[layout] for results in per_rank], CASES, dp=dp)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_bf16_hidden_int_mask_bool_flag_across_three_stages():
    # Mixed dtypes at every boundary with 3 stages: the receiver must allocate each tensor's own dtype.
    cases = [("tuple_bf16", "1f1b", 0.3), ("tuple_bf16", "gpipe", 0.0)]
    check(run_ranks(rank_main, 3, 3, cases, 3, 3), cases, dp=1, micro_batches=3, tol=1e-3)
