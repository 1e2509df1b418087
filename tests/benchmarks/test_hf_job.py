"""benchmarks/hf_job.py, the HF side of benchmarks/job.py as a process of its own, on the CPU: it writes one
row per prompt, and its left-padded batches give each prompt the tokens HF gives it alone (so the job it
times does the same work as ours)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conveyor.testing.tiny import save_tiny

from tests.conftest import ROOT, subprocess_env


@pytest.mark.integration
def test_the_hf_job_generates_each_prompts_own_greedy_tokens(tmp_path: Path) -> None:
    model = save_tiny("llama", tmp_path / "model")
    prompts = [[5, 17, 99], [230, 41, 8, 77, 12, 9, 3], [64], [11, 22, 33, 44, 55]]
    data = tmp_path / "input.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"p{i}", "input_ids": p}) + "\n" for i, p in enumerate(prompts))
    )
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "hf_job.py"), str(model), str(data), str(out)]
        + ["--new-tokens", "5", "--batch-size", "3", "--dtype", "float32", "--device", "cpu"],
        env=subprocess_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = json.loads(proc.stdout.strip().splitlines()[-1])
    assert phases["output_tokens"] == 4 * 5 and min(phases["import_s"], phases["load_s"]) > 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["p0", "p1", "p2", "p3"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    for prompt, row in zip(prompts, rows, strict=True):
        ids = torch.tensor([prompt])
        alone = reference.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert row["output_ids"] == alone[0, len(prompt) :].tolist(), prompt
