"""`make run`: a bare `conveyor run` runs the built-in tiny job, and its tokens are HF's greedy tokens."""

import json
import subprocess

import pytest
import torch

from tests.conftest import conveyor_cmd, subprocess_env


@pytest.mark.integration
def test_builtin_job_matches_single_process_hf(tmp_path):
    result = subprocess.run(
        conveyor_cmd("run", "--workdir", str(tmp_path)),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "outputs.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["p0", "p1", "p2", "p3"]

    from conveyor.examples import PROMPTS
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "tiny-llama")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama").eval()
    for row in rows:
        ids = tok(PROMPTS[int(row["id"][1:])], return_tensors="pt").input_ids
        with torch.no_grad():
            want = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert row["output_ids"] == want[0, ids.shape[1] :].tolist()
        assert row["finish_reason"] == "length"
