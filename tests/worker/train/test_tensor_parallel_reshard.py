"""A fine-tuning checkpoint resumed with another (stages, tensorParallel) than it was saved with.

The tiny random Llama (GQA: 4 heads, 2 KV heads) of test_tensor_parallel.py, trained with (stages,
tensorParallel, replicas) = (1, 2, 1) and stopped after step 7 (checkpoint at step 5), resumes with
(1, 1, 1), (2, 1, 1) and (2, 2, 1): from step 5 (the weights, the Adam moments cut from the saved shards
and the data position), on HF's single-process curve. And the other way: saved with (1, 1, 1), resumed
with (1, 2, 1), each rank cutting its part of the whole tensors.
"""

from __future__ import annotations

import shutil

import pytest

from tests.worker.pipe.harness import run_ranks
from tests.worker.train.ranks import fine_tune_outcome_rank
from tests.worker.train.test_tensor_parallel import STEPS, TOL, llama, tp_spec  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration
STOP, SAVED = 7, 5  # stopped after step 7: the last checkpoint (every 5) is step 5


def stopped(llama, root, stages, tensor_parallel):  # noqa: F811 (the fixture's value)
    model, data, *_ = llama
    ckpt = root / "ckpt"
    spec = tp_spec(model, data, ckpt, stages, tensor_parallel, 1)
    with pytest.raises(AssertionError, match=f"stopped after step {STOP}"):
        run_ranks(fine_tune_outcome_rank, stages * tensor_parallel, spec, str(ckpt), STOP, timeout=600)
    assert (ckpt / "latest").read_text().strip() == f"step-{SAVED}"
    return ckpt


@pytest.fixture(scope="module")
def saved_tp2(llama, tmp_path_factory):  # noqa: F811
    return stopped(llama, tmp_path_factory.mktemp("saved-tp2"), 1, 2)


def resume(llama, saved, tmp_path, stages, tensor_parallel):  # noqa: F811
    model, data, ref_losses, *_ = llama
    ckpt = shutil.copytree(saved, tmp_path / "ckpt")  # each resume its own copy of the stopped run's
    spec = tp_spec(model, data, ckpt, stages, tensor_parallel, 1)
    per_rank = run_ranks(fine_tune_outcome_rank, stages * tensor_parallel, spec, str(ckpt), timeout=600)
    for rank, (losses, _, resumed) in enumerate(per_rank):
        assert resumed == SAVED, rank
        assert sorted(losses) == list(range(SAVED + 1, STEPS + 1)), rank
        got = [losses[s] for s in range(SAVED + 1, STEPS + 1)]
        assert got == pytest.approx(ref_losses[SAVED:], rel=TOL, abs=TOL), rank
    assert (ckpt / "export" / "config.json").is_file()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("stages,tensor_parallel", [(1, 1), (2, 1), (2, 2)])
def test_a_tensor_parallel_checkpoint_resumes_with_another_layout(
    llama,  # noqa: F811
    saved_tp2,
    tmp_path,
    stages,
    tensor_parallel,
):
    resume(llama, saved_tp2, tmp_path, stages, tensor_parallel)


@pytest.mark.timeout(900)
def test_a_one_rank_checkpoint_resumes_tensor_parallel(llama, tmp_path):  # noqa: F811
    resume(llama, stopped(llama, tmp_path / "saved", 1, 1), tmp_path, 1, 2)
