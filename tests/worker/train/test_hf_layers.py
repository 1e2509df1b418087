"""The HF model as pipeline layers, for every causal family the inference pipeline supports: the loss
equals HF's own model on the same tokens, and the export writes back every tensor of the original
checkpoint under its own name, bit for bit (the inverse of the loader's fusing and transposing)."""

from __future__ import annotations

import pytest
import torch
from conveyor.inference.model.families import load_arch
from conveyor.pipe.module import PipelineModule
from conveyor.testing.tiny import FAMILIES, save_tiny
from conveyor.train.export import hf_state
from conveyor.train.hf_layers import causal_lm_loss, load_weights, parameter_count, pipeline_layers
from safetensors.torch import load_file


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_equals_hf_and_export_round_trips(tmp_path, family):
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny(family, tmp_path / family, tokenizer=False)
    arch = load_arch(model_dir)
    layers, roles = pipeline_layers(arch)
    module = PipelineModule(layers, num_stages=1, loss_fn=causal_lm_loss)
    load_weights(module, roles, model_dir, arch)

    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    expected = hf(ids, labels=ids).loss
    got = causal_lm_loss(module(ids), ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    got.backward()
    assert all(p.grad is not None for p in module.parameters())
    assert parameter_count(arch) == sum(p.numel() for p in hf.parameters())  # MFU's N (tied once)

    original = load_file(str(model_dir / "model.safetensors"))
    exported = hf_state(module, roles, arch, torch.float32, set(original))
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name


def test_an_encoder_is_refused(tmp_path):
    model_dir = save_tiny("bert", tmp_path / "bert", tokenizer=False)
    with pytest.raises(ValueError, match="not a causal LM"):
        pipeline_layers(load_arch(model_dir))


def test_a_checkpoint_exports_on_demand_equal_to_the_runs_export(tmp_path):
    """One process, no process group: 3 steps with a checkpoint at step 3; exporting that checkpoint
    later gives the tensors of the run's own export."""
    from conveyor.spec import parse_spec
    from conveyor.topology import Layout, Topology
    from conveyor.train.export_checkpoint import export_checkpoint, main
    from conveyor.train.finetune import fine_tune

    from tests.worker.train.reference import spec_dict, write_dataset

    model_dir = save_tiny("qwen2", tmp_path / "model")  # tied embeddings
    data = write_dataset(tmp_path / "data.jsonl")
    doc = spec_dict(model_dir, data, tmp_path / "ckpt", 1, 1, steps=3)
    doc["train"]["scheduler"] = None
    spec = parse_spec(doc)
    fine_tune(spec, Topology(Layout()), torch.device("cpu"), tmp_path / "ckpt")
    assert main([str(model_dir), str(tmp_path / "ckpt"), str(tmp_path / "again")]) == 0
    run, again = (
        load_file(str(tmp_path / "ckpt/export/model.safetensors")),
        load_file(str(tmp_path / "again/model.safetensors")),
    )
    assert set(run) == set(again) and all(torch.equal(run[k], again[k]) for k in run)
    assert not torch.equal(
        run["model.embed_tokens.weight"],
        load_file(str(model_dir / "model.safetensors"))["model.embed_tokens.weight"],
    )
    assert main([str(model_dir), str(tmp_path / "ckpt"), str(tmp_path / "x"), "--tag", "step-9"]) == 2
    # OUT over the checkpoints or the model: the export replaces OUT whole, so it deleted them
    for out in (tmp_path / "ckpt", tmp_path, model_dir):
        assert main([str(model_dir), str(tmp_path / "ckpt"), str(out)]) == 2
    assert (tmp_path / "ckpt" / "latest").is_file() and (model_dir / "model.safetensors").is_file()
    export_checkpoint(model_dir, tmp_path / "ckpt", tmp_path / "bf16", dtype=torch.bfloat16)
    assert load_file(str(tmp_path / "bf16/model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16
