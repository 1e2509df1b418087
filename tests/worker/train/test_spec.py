"""spec.train for fine-tuning: errors name the field and the fix; the engine config it means."""

from __future__ import annotations

import pytest
import torch
from conveyor.pipe.config import ConfigError
from conveyor.spec import SpecError, parse_spec
from conveyor.train.finetune import engine_config, uses_bf16


def spec(train=None, model=True, **extra):
    doc = {"mode": "train", "checkpoint": {"path": "/c"}, "train": train or {}, **extra}
    if model:
        doc["model"] = {"path": "/m"}
    return doc


@pytest.mark.parametrize(
    "doc,match",
    [
        (spec({}), "set exactly one of script .*, command .* or dataset"),
        (spec({"script": "a.py", "dataset": "d.jsonl", "steps": 2}), "got script, dataset"),
        (
            spec({"dataset": "d.jsonl", "steps": 2}, model=False),
            "spec.model is required with spec.train.dataset",
        ),
        (spec({"dataset": "d.jsonl"}), "spec.train.steps is required"),
        (
            spec(
                {"dataset": "d.jsonl", "steps": 2, "microBatchSize": 2, "globalBatchSize": 6},
                parallelism={"replicas": 2},
            ),
            r"globalBatchSize \(6\) is not a multiple of microBatchSize \(2\) x parallelism.replicas \(2\)",
        ),
        (spec({"dataset": "d", "steps": 2, "optimizer": {"type": "Lamb"}}), "spec.train.optimizer.type"),
        (spec({"dataset": "d", "steps": 2, "precision": "fp16"}), "spec.train.precision"),
        (spec({"command": []}), "spec.train.command"),
        (
            spec({"script": "a.py", "seqLength": 64, "seed": 1}),
            "spec.train.seed, spec.train.seqLength only applies to spec.train.dataset",
        ),
        (
            spec({"dataset": "d", "steps": 2, "config": {"a": 1}}),
            "spec.train.config only applies to a script or command",
        ),
    ],
)
def test_bad_train_specs_name_the_field(doc, match):
    with pytest.raises(SpecError, match=match):
        parse_spec(doc)


def test_tensor_parallel_fine_tuning_is_accepted():
    # stages x tensorParallel x replicas; whether T divides the heads is checked at the worker's start
    parsed = parse_spec(spec({"dataset": "d", "steps": 2}, parallelism={"stages": 2, "tensorParallel": 2}))
    assert parsed.parallelism.tensor_parallel == 2 and parsed.train.fine_tunes


def test_engine_config_from_the_spec():
    parsed = parse_spec(
        spec(
            {
                "dataset": "d.jsonl",
                "steps": 50,
                "microBatchSize": 2,
                "globalBatchSize": 16,
                "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}},
                "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 5}},
                "gradientClipping": 0.5,
            },
            parallelism={"stages": 2, "replicas": 2},
        )
    )
    train = parsed.train
    config = engine_config(train, replicas=2, bf16=True)
    assert config.resolve_batch(2) == (16, 2, 4)
    assert config.scheduler.params["total_num_steps"] == 50  # defaults to train.steps
    assert config.gradient_clipping == 0.5 and config.bf16.enabled
    assert uses_bf16(train, torch.device("cuda")) and not uses_bf16(train, torch.device("cpu"))
    bad = train.model_copy(update={"optimizer": train.optimizer.model_copy(update={"params": {"lrr": 1}})})
    with pytest.raises(ConfigError, match="spec.train"):
        engine_config(bad, replicas=2, bf16=False)
