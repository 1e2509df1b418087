"""The single-process reference: HF's own model trained with torch's AdamW, clipping and a warm-up +
cosine schedule written here (not conveyor's), on the micro-batches of conveyor's data order."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import torch
from conveyor.train.data import DataOrder, read_samples

STEPS = 20
LR, WEIGHT_DECAY, CLIP = 1e-2, 0.01, 1.0
WARMUP, MIN_WARMUP, MIN_COS = 5, 0.1, 0.1
SEQ, MICRO, GLOBAL, SEED = 16, 1, 4, 7


def write_dataset(path: Path, docs: int = 40, vocab: int = 320) -> Path:
    rng = random.Random(3)
    with open(path, "w") as f:
        for _ in range(docs):
            f.write(
                json.dumps({"input_ids": [rng.randrange(3, vocab) for _ in range(rng.randrange(5, 40))]})
                + "\n"
            )
    return path


def spec_dict(
    model: Path, data: Path, ckpt: Path, stages: int, replicas: int, steps: int = STEPS
) -> dict[str, Any]:
    return {
        "mode": "train",
        "device": "cpu",
        "model": {"path": str(model), "dtype": "float32"},
        "parallelism": {"stages": stages, "replicas": replicas},
        "checkpoint": {"path": str(ckpt), "every": 5, "keep": 2},
        "train": {
            "dataset": str(data),
            "seqLength": SEQ,
            "steps": steps,
            "microBatchSize": MICRO,
            "globalBatchSize": GLOBAL,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY}},
            "scheduler": {
                "type": "WarmupCosineLR",
                "params": {
                    "warmup_num_steps": WARMUP,
                    "warmup_type": "linear",
                    "warmup_min_ratio": MIN_WARMUP,
                    "cos_min_ratio": MIN_COS,
                },
            },
            "gradientClipping": CLIP,
            "seed": SEED,
        },
    }


def lr_ratio(step: int) -> float:
    if step < WARMUP:
        return MIN_WARMUP + (1 - MIN_WARMUP) * step / WARMUP
    done = min(1.0, (step - WARMUP + 1) / (STEPS - WARMUP))
    return MIN_COS + (1 - MIN_COS) * (1 + math.cos(math.pi * done)) / 2


def hf_train(
    model_dir: Path,
    data: Path,
    steps: int = STEPS,
    schedule: bool = True,
    dropout: bool = True,
    grad_norms: list[float] | None = None,
) -> tuple[list[float], Any]:
    """Per-step mean losses and the trained HF model (``schedule`` False: a constant learning rate;
    ``dropout`` False: the model's dropout off, as conveyor fine-tunes); each step's gradient norm before
    clipping appended to ``grad_norms`` if given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).train(dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    # DeepSpeed's schedule: step k runs at iteration k - 1 (the first two at 0)
    ratio = (lambda step: lr_ratio(max(0, step - 1))) if schedule else (lambda _: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, ratio)
    order = DataOrder(read_samples(data, SEQ, True, eos_id=2), SEED, GLOBAL, 1, MICRO)
    losses = []
    for step in range(steps):
        batches = order.micro_batches(step * GLOBAL, 0)
        total = 0.0
        for inputs, labels in batches:
            loss = model(input_ids=inputs, labels=labels).loss
            (loss / len(batches)).backward()
            total += float(loss.detach()) / len(batches)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        if grad_norms is not None:
            grad_norms.append(float(norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, model.eval()


def assert_output_is_the_exports_greedy_tokens(
    output: Path, export: Path, trained: Any, prompts: list
) -> None:
    """An inference job's ``output`` on the fine-tuning ``export`` (6 new tokens a prompt, greedy): the
    export generates as the ``trained`` HF model does, and each row is the export's greedy tokens (up to
    an end token)."""
    from transformers import AutoModelForCausalLM

    rows = {r["id"]: r["output_ids"] for r in map(json.loads, output.read_text().splitlines())}
    loaded = AutoModelForCausalLM.from_pretrained(str(export)).float().eval()
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            want = loaded.generate(
                torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None
            )
            mine = trained.generate(
                torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None
            )
        assert (
            want[0, len(prompt) :].tolist() == mine[0, len(prompt) :].tolist()
        )  # the export is the trained model
        assert rows[i] == want[0, len(prompt) :].tolist()[: len(rows[i])], i
        assert len(rows[i]) == 6 or rows[i][-1] == 2


def assert_export_is_tied_and_trained(export: Path, trained: Any) -> None:
    """The ``export`` of a tied-embeddings model: its config says tied, HF loads one tensor for the
    embedding and the head, and it holds the ``trained`` HF model's embedding."""
    from transformers import AutoModelForCausalLM

    assert json.loads((export / "config.json").read_text())["tie_word_embeddings"] is True
    loaded = AutoModelForCausalLM.from_pretrained(str(export)).float().eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(
        loaded.model.embed_tokens.weight, trained.model.embed_tokens.weight, rtol=1e-3, atol=1e-4
    )
