"""``conveyor generate``: text in, the same tokens as HF generate out, with the ranks it starts itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conveyor.testing.tiny import save_tiny

from tests.worker.inference.generation import conveyor_generate, rows_by_prompt


@pytest.mark.integration
def test_generate_two_stages_matches_hf(tmp_path: Path) -> None:
    import transformers as T

    d = save_tiny("qwen2", tmp_path / "m")
    prompts = ["hello world", "the quick brown fox jumps over", "a"]  # 3 on 2 stages: a lane unused
    proc = conveyor_generate(d, prompts, "--stages", "2", "--max-new-tokens", "6", OMP_NUM_THREADS="1")
    rows = rows_by_prompt(proc)
    assert "tokens/s" in proc.stderr
    tok = T.AutoTokenizer.from_pretrained(d)
    hf = T.AutoModelForCausalLM.from_pretrained(d).eval()
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"]])
        want = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1] :].tolist()
        assert rows[p]["output_ids"] == want
        assert rows[p]["text"] == tok.decode(want, skip_special_tokens=True)


def test_generate_refuses_an_unsupported_family(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    proc = conveyor_generate(tmp_path, ["hi"], timeout=120)
    assert proc.returncode != 0
    assert "model family 't5'" in proc.stderr and "supported families: llama" in proc.stderr
