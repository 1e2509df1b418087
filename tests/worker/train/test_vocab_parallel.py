"""Vocabulary-parallel embedding and head (train/vocab_parallel.py) where test_tensor_parallel.py does not
reach: tied embeddings split over the vocabulary and over 2 stages, and a vocabulary 2 does not divide.

- A tiny Llama with tied embeddings, (stages, tensorParallel, replicas) = (2, 2, 1): the embedding on stage
  0 and the head on stage 1 are one weight per tensor rank (its vocabulary half); 12 steps give HF's
  per-step losses and gradient norms (the norm counts each half once) within 2e-4, and the export is tied
  and holds the trained embedding, whole.
- A vocabulary of 321 over 2 tensor ranks stays replicated: each rank holds the whole logits, and the
  loss, gradients and gradient norm equal HF's.
"""

from __future__ import annotations

import pytest
import torch
from conveyor.testing.tiny import save_tiny

from tests.worker.pipe.harness import run_ranks
from tests.worker.train.ranks import fine_tune_outcome_rank, tensor_parallel_gradients_rank
from tests.worker.train.reference import assert_export_is_tied_and_trained, hf_train, write_dataset
from tests.worker.train.test_tensor_parallel import STEPS, TOL, tp_spec

pytestmark = pytest.mark.integration


@pytest.mark.timeout(900)
def test_tied_embeddings_split_over_the_vocabulary_and_two_stages_equal_hf(tmp_path):

    model = save_tiny("llama", tmp_path / "model", tie_word_embeddings=True)
    data = write_dataset(tmp_path / "data.jsonl")
    ref_norms: list[float] = []
    ref_losses, trained = hf_train(model, data, steps=STEPS, schedule=False, grad_norms=ref_norms)
    spec = tp_spec(model, data, tmp_path / "ckpt", 2, 2, 1)
    per_rank = run_ranks(fine_tune_outcome_rank, 4, spec, str(tmp_path / "ckpt"), timeout=800)
    for rank, (losses, norms, _) in enumerate(per_rank):
        assert [losses[s] for s in range(1, STEPS + 1)] == pytest.approx(ref_losses, rel=TOL, abs=TOL), rank
        assert [norms[s] for s in range(1, STEPS + 1)] == pytest.approx(ref_norms, rel=TOL), rank

    assert_export_is_tied_and_trained(tmp_path / "ckpt" / "export", trained)


@pytest.mark.timeout(600)
def test_a_vocabulary_two_does_not_divide_stays_replicated(tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny("llama", tmp_path / "model", tokenizer=False, vocab_size=321)
    ids = torch.randint(3, 321, (2, 12), generator=torch.Generator().manual_seed(1))
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    loss = hf(ids, labels=ids).loss
    loss.backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    hf_norm = float(torch.nn.utils.get_total_norm(list(hf_grads.values())))
    for rank, (got, gaps, norm, _, grads, logits) in enumerate(
        run_ranks(tensor_parallel_gradients_rank, 2, str(model_dir), ids, timeout=300)
    ):
        assert logits == (*ids.shape, 321), rank
        assert got == pytest.approx(float(loss.detach()), rel=1e-5), rank
        assert gaps == {}, rank
        assert norm == pytest.approx(hf_norm, rel=1e-5), rank
        for name, grad in hf_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
