"""``init_inference(model_on_meta, tensor_parallel=2, checkpoint=...)`` on CPU processes with gloo: the
model is built on the meta device from its config, each rank reads only its slices of the saved
safetensors (``get_slice``) and gets the single-process model's logits and greedy tokens, with buffers
(rotary ``inv_freq``) recomputed and tied weights still tied. Memory is asserted in bytes: a rank's
parameters are the replicated ones plus exactly 1/TP of every split one, it reads exactly that much of
each split tensor, and at no moment while loading does it hold more than its own shard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import conveyor
import pytest
import torch

from tests.worker.autotp.families import build
from tests.worker.inference.launch import run_ranks

RTOL = 2e-5


def _saved(tmp: Path, family: str, original_format: bool = True) -> Path:
    model, _ = build(family)
    path = tmp / family
    # safetensors; transformers 5.x writes MoE experts one tensor per expert unless told to keep them fused
    model.save_pretrained(path, save_original_format=original_format)
    return path


def _ranks(
    tmp: Path, tp: int, family: str, how: str = "dir", kernel: bool = False, original_format: bool = True
) -> list[dict[str, Any]]:
    ckpt = _saved(tmp, family, original_format)
    out = tmp / f"{family}-{how}-{kernel}.json"
    argv = ["-m", "tests.worker.autotp.meta_main", str(out), str(tp), str(ckpt), family, how]
    run_ranks(tp, argv + (["kernel"] if kernel else []), timeout=600)
    return list(json.loads(out.read_text()))


def _check_outputs(row: dict[str, Any]) -> None:
    assert "error" not in row, row["error"]
    assert row["max_abs_diff"] <= RTOL * max(row["ref_max_abs"], 1.0), row
    assert row["tokens_equal"], row


def _check_memory(rows: list[dict[str, Any]], tp: int, beside: int = 0) -> None:
    """``beside``: bytes a rank may hold past its final shard while a slice is assembled run by run."""
    for rank, row in enumerate(rows):
        r = row["report"]
        full, read, sliced = r["full_bytes"], r["read_bytes"], set(r["sliced"])
        assert sliced, "nothing was split"
        replicated = sum(b for k, b in full.items() if k not in sliced)
        split = sum(full[k] for k in sliced)
        # exactly 1/TP of every split tensor (heads, channels, vocabulary all divide evenly here)
        assert r["param_bytes"] == replicated + split // tp, (rank, r["param_bytes"], replicated, split)
        assert r["held_param_bytes"] == r["param_bytes"]
        assert r["param_bytes"] < (replicated + split) * (1 / tp + 0.15)
        for key in sliced:  # only its slice of each split tensor came off the disk
            assert read[key] == full[key] // tp, (rank, key, read[key], full[key])
        # never more parameter bytes in hand than the rank's own shard (plus ``beside``), not even one
        # full linear
        assert r["param_bytes"] <= r["peak_bytes"] <= r["param_bytes"] + beside, (rank, r, beside)


@pytest.mark.integration
# Phi-3: each rank reads its q, k and v heads of the fused qkv_proj (three runs of rows)
@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_meta_model_tp2_reads_only_its_slices(family: str, tmp_path: Path) -> None:
    rows = _ranks(tmp_path, 2, family, how="files" if family == "gpt2" else "dir")
    for row in rows:
        _check_outputs(row)
        assert not row["kernel_injected"]
        assert row["on_meta"] == []
        assert all(row["buffers_equal"].values()), row["buffers_equal"]
        if family != "gpt2":
            assert "model.rotary_emb.inv_freq" in row["buffers_equal"]
        else:  # GPT-2's LM head is the (vocabulary-sliced) input embedding, one tensor
            assert row["tied"]
    _check_memory(rows, 2)


@pytest.mark.integration
@pytest.mark.parametrize("original_format", [True, False], ids=["per-expert", "fused"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_meta_moe_model_tp2_reads_only_its_slices(family: str, original_format: bool, tmp_path: Path) -> None:
    """MoE experts are fused 3D parameters in transformers 5.x; the checkpoint holds them per expert
    (``save_pretrained``'s default) or fused. Either way each rank reads only its slice of every expert."""
    rows = _ranks(tmp_path, 2, family, original_format=original_format)
    for row in rows:
        _check_outputs(row)
        assert row["on_meta"] == []
        assert row["experts_implementation"] == "grouped_mm"  # restored after the meta trace
        assert all(row["buffers_equal"].values()), row["buffers_equal"]
        sliced = row["report"]["sliced"]
        experts = {layer: sum(f"layers.{layer}.mlp.experts." in k for k in sliced) for layer in (0, 1)}
        assert experts == {0: 2, 1: 2}, sliced  # gate_up_proj and down_proj of each layer split
    full = rows[0]["report"]["full_bytes"]
    n_experts = 4
    # assembled from per-expert tensors, a slice is filled one run at a time: one expert's share of one
    # projection (its down_proj slice) is in hand beside the result at worst
    one_run = max(b for k, b in full.items() if k.endswith("experts.down_proj")) // (2 * n_experts)
    _check_memory(rows, 2, beside=one_run if original_format else 0)


@pytest.mark.integration
@pytest.mark.parametrize("family", ["gpt_oss", "llama4"])
def test_meta_transposed_experts_tp2_read_only_their_slices(family: str, tmp_path: Path) -> None:
    """Experts stored transposed ([experts, hidden, 2 x inner]; GPT-OSS's with biases and gate|up
    interleaved): built on the meta device and read from the checkpoint, each rank reads and holds exactly
    half of every split tensor (GPT-OSS's down-projection bias whole, zeroed past rank 0) and matches the
    single-process model."""
    rows = _ranks(tmp_path, 2, family)
    for row in rows:
        _check_outputs(row)
        assert row["on_meta"] == []
        sliced = row["report"]["sliced"]
        assert sum(".experts." in k for k in sliced) == (6 if family == "gpt_oss" else 4), sliced
    full = rows[0]["report"]["full_bytes"]
    one_run = max(b for k, b in full.items() if k.endswith("experts.down_proj")) // (2 * 4)
    _check_memory(rows, 2, beside=one_run)


@pytest.mark.integration
def test_meta_model_kernel_inject_tp2_from_checkpoint(tmp_path: Path) -> None:
    rows = _ranks(tmp_path, 2, "llama", kernel=True)
    for row in rows:
        _check_outputs(row)
        assert row["kernel_injected"]


def test_meta_model_without_checkpoint_refused() -> None:
    model, _ = build("llama")
    with torch.device("meta"):
        meta = type(model)(model.config)
    with pytest.raises(conveyor.autotp.AutoTPError, match="meta device: pass checkpoint="):
        conveyor.init_inference(meta, tensor_parallel=1)


def test_bad_checkpoint_refused(tmp_path: Path) -> None:
    model, _ = build("gpt2")
    with pytest.raises(conveyor.autotp.AutoTPError, match="no \\*.safetensors"):
        conveyor.init_inference(model, tensor_parallel=1, checkpoint=tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(conveyor.autotp.AutoTPError, match="not a .safetensors file"):
        conveyor.init_inference(model, tensor_parallel=1, checkpoint=[tmp_path / "pytorch_model.bin"])
    other = _saved(tmp_path, "llama")
    with torch.device("meta"):
        meta = type(model)(model.config)
    with pytest.raises(conveyor.autotp.AutoTPError, match="has no tensor for"):
        conveyor.init_inference(meta, tensor_parallel=1, checkpoint=other)


def test_deepspeed_checkpoint_json(tmp_path: Path) -> None:
    """DeepSpeed's checkpoint json ({"type", "checkpoints", "version"}) names the files."""
    model, _ = build("gpt2")
    ids = torch.arange(3, 10).unsqueeze(0)
    with torch.no_grad():
        ref = model(ids).logits
    path = _saved(tmp_path, "gpt2")
    files = [p.name for p in path.glob("*.safetensors")]
    spec = tmp_path / "ds.json"
    spec.write_text(
        json.dumps({"type": "ds_model", "checkpoints": files, "version": 1.0, "base_dir": str(path)})
    )
    with torch.device("meta"):
        meta = type(model)(model.config)
    engine = conveyor.init_inference(meta, tensor_parallel=1, checkpoint=str(spec))
    with torch.no_grad():
        assert torch.equal(engine.module(ids).logits, ref)
