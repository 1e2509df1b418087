"""Fine-tuning a tiny random Llama from the spec equals HF's own single-process training (same data
order, AdamW, clipping, warm-up + cosine schedule): per-step losses for (stages, replicas) in (1, 1),
(2, 1), (2, 2), a tied-embedding model over 2 stages and GPT-2 over 2 stages; the export loads in HF as is and gives the
trained reference's logits."""

from __future__ import annotations

import pytest
import torch
from conveyor.testing.tiny import save_tiny

from tests.worker.pipe.harness import run_ranks
from tests.worker.train.ranks import fine_tune_rank
from tests.worker.train.reference import (
    STEPS,
    assert_export_is_tied_and_trained,
    hf_train,
    spec_dict,
    write_dataset,
)

pytestmark = pytest.mark.integration
TOL = 2e-4


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    model = save_tiny("llama", root / "model")
    data = write_dataset(root / "data.jsonl")
    losses, trained = hf_train(model, data)
    return root, model, data, losses, trained


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stages,replicas", [(1, 1), (2, 1), (2, 2)])
def test_losses_equal_hf_training(llama, tmp_path, stages, replicas):
    _, model, data, ref_losses, trained = llama
    spec = spec_dict(model, data, tmp_path / "ckpt", stages, replicas)
    per_rank = run_ranks(fine_tune_rank, stages * replicas, spec, str(tmp_path / "ckpt"), timeout=500)
    for rank, losses in enumerate(per_rank):
        assert sorted(losses) == list(range(1, STEPS + 1))
        got = [losses[s] for s in range(1, STEPS + 1)]
        assert got == pytest.approx(ref_losses, rel=TOL, abs=TOL), f"rank {rank}"
    assert ref_losses[-1] < ref_losses[0] - 1.0, "the run must actually learn"

    # The export: a plain HF directory that loads as is and gives the trained model's logits.
    from transformers import AutoModelForCausalLM

    export = tmp_path / "ckpt" / "export"
    files = sorted(p.name for p in export.iterdir())
    assert "config.json" in files and "tokenizer.json" in files
    assert ("model.safetensors.index.json" in files) == (stages > 1)
    assert not (tmp_path / "ckpt" / "export.tmp").exists()
    loaded = AutoModelForCausalLM.from_pretrained(str(export)).float().eval()
    ids = torch.tensor([[5, 17, 99, 230, 41, 8, 77]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained(ids).logits, rtol=1e-3, atol=1e-3)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == f"step-{STEPS}"


@pytest.mark.timeout(600)
def test_tied_embeddings_over_two_stages_equal_hf(tmp_path):
    # The embedding is stage 0's first layer and stage 1's head: the copies must stay one weight.
    model = save_tiny("llama", tmp_path / "model", tie_word_embeddings=True)
    data = write_dataset(tmp_path / "data.jsonl")
    ref_losses, trained = hf_train(model, data, steps=8, schedule=False)
    spec = spec_dict(model, data, tmp_path / "ckpt", 2, 1, steps=8)
    spec["train"]["scheduler"] = None
    per_rank = run_ranks(fine_tune_rank, 2, spec, str(tmp_path / "ckpt"), timeout=500)
    for losses in per_rank:
        assert [losses[s] for s in range(1, 9)] == pytest.approx(ref_losses, rel=TOL, abs=TOL)
    assert_export_is_tied_and_trained(tmp_path / "ckpt" / "export", trained)


@pytest.mark.timeout(600)
def test_gpt2_over_two_stages_equals_hf_without_dropout(tmp_path):
    # Conv1D weights, learned positions and tied embeddings; GPT-2's dropout is not applied (a warning).
    model = save_tiny("gpt2", tmp_path / "model")
    data = write_dataset(tmp_path / "data.jsonl")
    ref_losses, _ = hf_train(model, data, steps=6, schedule=False, dropout=False)
    spec = spec_dict(model, data, tmp_path / "ckpt", 2, 1, steps=6)
    spec["train"]["scheduler"] = None
    for losses in run_ranks(fine_tune_rank, 2, spec, str(tmp_path / "ckpt"), timeout=500):
        assert [losses[s] for s in range(1, 7)] == pytest.approx(ref_losses, rel=TOL, abs=TOL)
