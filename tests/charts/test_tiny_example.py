"""deploy/examples/tiny-cpu-inference.yaml really runs: `conveyor run` on this CPU, 2 pipeline stages, and
its greedy tokens equal single-process HF `generate` on the same tiny random Llama."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.charts.helm import ROOT
from tests.conftest import conveyor_cmd, subprocess_env

EXAMPLES = ROOT / "deploy" / "examples"
MAX_NEW_TOKENS = 8


@pytest.mark.integration
def test_tiny_cpu_inference_example_matches_hf_generate(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copy(EXAMPLES / "tiny-cpu-inference.yaml", tmp_path)
    shutil.copy(EXAMPLES / "tiny-prompts.jsonl", tmp_path)
    env = subprocess_env()
    subprocess.run(
        [sys.executable, str(EXAMPLES / "make-tiny-llama.py"), str(tmp_path / "tiny-llama")],
        env=env,
        check=True,
        timeout=120,
        capture_output=True,
    )
    run = subprocess.run(
        conveyor_cmd("run", str(tmp_path / "tiny-cpu-inference.yaml")),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"conveyor run failed:\n{run.stderr[-4000:]}"

    results = {}
    for line in (tmp_path / "out" / "tiny-results.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["id"] not in results, f"prompt {row['id']} answered twice"
        results[row["id"]] = row
    prompts = [json.loads(line) for line in (tmp_path / "tiny-prompts.jsonl").read_text().splitlines()]
    assert set(results) == {p["id"] for p in prompts}

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama", dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    for prompt in prompts:
        with torch.no_grad():
            reference = model.generate(
                torch.tensor([prompt["input_ids"]]),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt["input_ids"]) :].tolist()
        got = results[prompt["id"]]["output_ids"]
        # The engine may stop early at the model's EOS; up to there the tokens must be the same.
        assert got == reference[: len(got)], f"{prompt['id']}: {got} != HF {reference}"
        assert len(got) == MAX_NEW_TOKENS or got[-1] == eos, (
            f"{prompt['id']}: stopped early without EOS: {got}"
        )
