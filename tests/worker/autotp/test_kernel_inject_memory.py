"""Memory of ``replace_with_kernel_inject=True`` on a live HF module, per rank, in tensor bytes: the HF
module's layers are freed as the stage model is filled, so while building a rank holds the HF model plus
at most one layer's shard, never the HF model plus its whole shard; afterwards only its shard.

Bytes are counted from outside the loader: every CPU tensor the garbage collector can see, one count per
storage, sampled at each tensor the loader reads (the moment before it is copied into the stage model).
The ranks of TP 2 are built one after another in this process (building needs no process group; the
outputs at TP 2 are checked against HF's in test_kernel_inject.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conveyor.autotp.kernel_inject import build_fast_module
from conveyor.inference.model import loader

from tests.worker.autotp.families import build, prompt

LAYERS = 6  # enough layers that one layer is well under a TP-2 shard


def live_bytes() -> int:
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":  # type(): no proxy's __class__
            storage = obj.untyped_storage()
            try:
                storages[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:  # a fake tensor an earlier test's tracing left for the collector: no memory
                continue
    return sum(storages.values())


def _nbytes(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@pytest.fixture
def sampled(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Live tensor bytes at every tensor the loader yields or looks up."""
    samples: list[int] = []
    layer_tensors = loader._LayerReader.tensors
    global_tensor = loader._global

    def tensors(self: Any) -> Iterator[tuple[str, torch.Tensor]]:
        for item in layer_tensors(self):
            samples.append(live_bytes())
            yield item

    def global_(*args: Any) -> Any:
        found = global_tensor(*args)
        samples.append(live_bytes())
        return found

    monkeypatch.setattr(loader._LayerReader, "tensors", tensors)
    monkeypatch.setattr(loader, "_global", global_)
    return samples


def _build(model: torch.nn.Module, tp: int, rank: int) -> Any:
    return build_fast_module(
        model,
        tp=tp,
        rank=rank,
        group=None,
        tensor_src=0,
        dtype=None,
        device=torch.device("cpu"),
        max_out_tokens=64,
        files=None,
    )


@pytest.mark.parametrize(("tp", "rank"), [(1, 0), (2, 0), (2, 1)])
def test_hf_module_freed_layer_by_layer_while_the_shard_is_built(
    tp: int, rank: int, sampled: list[int]
) -> None:
    model, _ = build("llama", num_hidden_layers=LAYERS)
    ids = prompt()
    with torch.no_grad():
        ref = model(ids).logits if tp == 1 else None
    hf = _nbytes(model)
    layer = _nbytes(model.model.layers[0])
    gc.collect()
    before = live_bytes()  # everything else in the process, plus the HF model

    fast = _build(model, tp, rank)
    gc.collect()
    after = live_bytes()
    shard = _nbytes(fast)
    peak = max(sampled)

    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    # only the shard is left: the HF model's storage is gone, not merely its module entries
    assert after - (before - hf) == shard, (before, after, hf, shard)
    if tp == 2:
        assert layer < shard // 2 < hf  # the bound below is tighter than the whole shard
    # while building: the HF model (shrinking) plus the shard (growing), over the start by at most one
    # layer's shard, fused copies included (had the shard been allocated up front: the whole shard)
    assert peak - before <= layer // tp, (peak - before, layer, shard)
    print(
        f"tp={tp} rank={rank}: HF {hf} B, shard {shard} B, one layer {layer} B, peak over start {peak - before} B"
    )
    if ref is not None:
        with torch.no_grad():
            logits = fast(ids).logits
        assert (logits - ref).abs().max() <= 2e-5 * max(ref.abs().max().item(), 1.0)


def test_a_state_dict_the_caller_holds_keeps_the_hf_weights(sampled: list[int]) -> None:
    """What cannot be freed: tensors sharing the HF weights' storage that the caller still holds."""
    model, _ = build("llama", num_hidden_layers=LAYERS)
    held = model.state_dict()
    hf = _nbytes(model)
    kept = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held.values()}.values())
    assert kept == hf - 32  # all but the rotary inv_freq buffer (8 floats, not in a state_dict)
    gc.collect()
    before = live_bytes()
    fast = _build(model, 1, 0)
    gc.collect()
    assert all(t.is_meta for t in model.parameters())  # the module let go of them ...
    assert live_bytes() - before == _nbytes(fast) - (hf - kept)  # ... but their storage is still held
