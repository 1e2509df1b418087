"""The built-in job of a bare ``conveyor run``: a tiny random-weight Llama answering a few prompts over
two pipeline stages on the CPU. Everything is made here, offline, under ``workdir`` (default
``./conveyor-run``): the HF checkpoint (safetensors + a small tokenizer), the prompts, and the output.
"""

from __future__ import annotations

import json
from pathlib import Path

from conveyor.spec import PipelineJob, parse_job

PROMPTS = [
    "the pipeline moves",
    "tensor parallel ranks share",
    "a checkpoint is committed",
    "every stage",
]


def default_job(workdir: Path | None = None) -> PipelineJob:
    root = (workdir or Path.cwd() / "conveyor-run").resolve()
    model_dir = root / "tiny-llama"
    if not (model_dir / "config.json").is_file():
        from conveyor.testing.tiny import save_tiny

        save_tiny("llama", model_dir, seed=0, num_hidden_layers=4)
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS))
    )
    output = root / "outputs.jsonl"
    # A fresh run each time: the built-in job is a demonstration, not a resumable batch.
    for stale in (output, output.with_name(output.name + ".progress.json")):
        stale.unlink(missing_ok=True)
    return parse_job(
        {
            "apiVersion": "conveyor.dev/v1alpha1",
            "kind": "PipelineJob",
            "metadata": {"name": "tiny-llama-2-stages"},
            "spec": {
                "mode": "inference",
                "device": "cpu",
                "model": {"path": str(model_dir), "dtype": "float32"},
                "parallelism": {"stages": 2},
                "inference": {
                    "input": str(prompts),
                    "output": str(output),
                    "maxNewTokens": 12,
                    "batchSize": 4,
                },
            },
        }
    )
