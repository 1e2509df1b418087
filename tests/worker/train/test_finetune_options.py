"""Fine-tuning options in one process (no process group): activation checkpointing changes nothing but
memory; bf16 (autocast over fp32 master weights) follows the fp32 curve; progress reaches the metrics
registry; MFU is left out where the peak is unknown (the CPU)."""

from __future__ import annotations

import pytest
import torch
from conveyor.inference.model.families import load_arch
from conveyor.spec import parse_spec
from conveyor.testing.tiny import save_tiny
from conveyor.topology import Layout, Topology
from conveyor.train.finetune import fine_tune
from conveyor.train.hf_layers import parameter_count
from conveyor.train.progress import flops_per_token, peak_flops
from prometheus_client import REGISTRY

from tests.worker.train.reference import spec_dict, write_dataset

STEPS = 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("opts")
    return save_tiny("llama", root / "model", tokenizer=False), write_dataset(root / "data.jsonl")


def run(files, tmp_path, name, **train):
    model, data = files
    doc = spec_dict(model, data, tmp_path / name, 1, 1, steps=STEPS)
    doc["train"]["scheduler"] = None
    doc["train"].update(train)
    outcome = fine_tune(parse_spec(doc), Topology(Layout()), torch.device("cpu"), tmp_path / name, job=name)
    return [outcome.losses[s] for s in range(1, STEPS + 1)]


def test_activation_checkpointing_gives_the_same_losses(files, tmp_path):
    plain = run(files, tmp_path, "plain")
    assert run(files, tmp_path, "recompute", activationCheckpointing=True) == pytest.approx(plain, rel=1e-6)


def test_bf16_follows_the_fp32_curve(files, tmp_path):
    fp32 = run(files, tmp_path, "fp32", precision="fp32")
    bf16 = run(files, tmp_path, "bf16", precision="bf16")
    assert bf16 == pytest.approx(fp32, rel=3e-2) and bf16 != fp32  # autocast did run in bf16


def test_progress_is_in_the_metrics_and_mfu_needs_a_known_peak(files, tmp_path):
    run(files, tmp_path, "metrics")
    labels = {"job": "metrics"}
    assert REGISTRY.get_sample_value("conveyor_train_tokens_per_second", labels) > 0
    assert REGISTRY.get_sample_value("conveyor_train_step", labels) == STEPS
    assert REGISTRY.get_sample_value("conveyor_last_checkpoint_step", labels) == STEPS
    assert REGISTRY.get_sample_value("conveyor_train_mfu_ratio", labels) is None  # the CPU: no peak
    assert peak_flops(torch.device("cpu"), bf16=True) is None

    arch = load_arch(files[0])
    n = parameter_count(arch)
    from transformers import AutoModelForCausalLM

    assert n == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(files[0])).parameters())
    assert flops_per_token(arch, n, 16) == 6 * n + 12 * arch.layers * arch.heads * arch.head_dim * 16


def test_a_sequence_longer_than_the_models_positions_is_refused_before_a_step(tmp_path):
    # GPT-2's learned position table has n_positions rows: a longer seqLength was an IndexError in the
    # first step, a crash that the job restarted three times
    from conveyor.failure import is_refusal
    from conveyor.inference.validate import InputError, preflight

    from tests.worker.train.reference import spec_dict, write_dataset

    model = save_tiny("gpt2", tmp_path / "gpt2", tokenizer=False)  # 256 positions
    doc = spec_dict(model, write_dataset(tmp_path / "d.jsonl", docs=400), tmp_path / "ck", 1, 1, steps=1)
    doc["train"].update(seqLength=300, scheduler=None)
    spec = parse_spec(doc)
    match = r"spec\.train\.seqLength 300 is longer than the model's 256 positions .* use seqLength <= 256"
    with pytest.raises(InputError, match=match):
        preflight(spec)  # the pods', before any rank starts
    with pytest.raises(InputError, match=match) as err:
        fine_tune(spec, Topology(Layout()), torch.device("cpu"), tmp_path / "ck")  # each rank's
    assert is_refusal(err.value) and not (tmp_path / "ck").exists()
    doc["train"]["seqLength"] = 256
    assert (
        len(fine_tune(parse_spec(doc), Topology(Layout()), torch.device("cpu"), tmp_path / "ok").losses) == 1
    )


@pytest.mark.parametrize("where", ["ck", ".", "model", "data.jsonl"])
def test_an_export_path_that_would_replace_the_checkpoints_model_or_data_is_refused(tmp_path, where):
    # the export replaces its directory whole: `export: <checkpoint.path>` deleted every checkpoint at
    # the end of the run (reported completed; extended, it trained again from step 1)
    from conveyor.failure import is_refusal
    from conveyor.inference.validate import InputError

    from tests.worker.train.reference import spec_dict, write_dataset

    model = save_tiny("llama", tmp_path / "model", tokenizer=False)
    doc = spec_dict(model, write_dataset(tmp_path / "data.jsonl"), tmp_path / "ck", 1, 1, steps=1)
    doc["train"].update(scheduler=None, export=str(tmp_path / where))
    with pytest.raises(InputError, match=r"spec\.train\.export .* would replace the") as err:
        fine_tune(parse_spec(doc), Topology(Layout()), torch.device("cpu"), tmp_path / "ck")
    assert is_refusal(err.value) and not (tmp_path / "ck").exists() and (tmp_path / "model").is_dir()


def test_each_step_logs_the_learning_rate_it_ran_at(files, tmp_path, caplog, monkeypatch):
    """The log's lr was read after the step, where the schedule had moved on to the next step's."""
    import logging

    from conveyor.train import finetune

    used: list[float] = []
    engine_init = finetune.PipelineEngine.__init__

    def watch(self, *args, **kwargs):  # the rate each optimizer step really runs at
        engine_init(self, *args, **kwargs)
        self.optimizer.register_step_pre_hook(lambda opt, *_: used.append(opt.param_groups[0]["lr"]))

    warmup = {
        "type": "WarmupLR",
        "params": {"warmup_max_lr": 0.01, "warmup_num_steps": 3, "warmup_type": "linear"},
    }
    monkeypatch.setattr(finetune.PipelineEngine, "__init__", watch)
    with caplog.at_level(logging.INFO, logger="conveyor.train"):
        run(files, tmp_path, "lr", scheduler=warmup)
    logged = [r.lr for r in caplog.records if r.getMessage() == "fine-tune step"]
    assert used == pytest.approx([0.0, 0.0, 0.01 / 3, 0.02 / 3])  # DeepSpeed's: iteration k - 1 at step k
    assert logged == pytest.approx(used)
