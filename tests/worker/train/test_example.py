"""deploy/examples/finetune-tiny-llama.yaml runs under `conveyor run` (2 stages x 2 replicas): it trains,
checkpoints, exports an HF directory that loads as is, and a restart after completion trains nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, conveyor_cmd, subprocess_env

EXAMPLES = ROOT / "deploy" / "examples"
pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
def test_finetune_example_trains_exports_and_completes(tmp_path):
    env = subprocess_env(OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, str(EXAMPLES / "make-tiny-llama.py"), str(tmp_path / "model")], env=env, check=True
    )
    doc = yaml.safe_load((EXAMPLES / "finetune-tiny-llama.yaml").read_text())
    doc["spec"]["model"]["path"] = str(tmp_path / "model")
    doc["spec"]["train"]["dataset"] = str(EXAMPLES / "tiny-finetune.jsonl")
    doc["spec"]["train"]["steps"] = 6
    doc["spec"]["checkpoint"].update(path=str(tmp_path / "ckpt"), every=3)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))

    first = subprocess.run(
        conveyor_cmd("run", str(job)), env=env, capture_output=True, text=True, timeout=500
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("fine-tune step") == 6 and "model exported" in first.stdout
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step-6"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = tmp_path / "ckpt" / "export"
    model = AutoModelForCausalLM.from_pretrained(str(export))
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    assert model.config.num_hidden_layers == 4 and tokenizer("the quick brown fox")["input_ids"]

    again = subprocess.run(
        conveyor_cmd("run", str(job), "--restart", "1"), env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "fine-tuning already complete" in again.stdout and "fine-tune step" not in again.stdout
