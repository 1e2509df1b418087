"""What a rank reads from the checkpoint: only its stage's tensors and, under tensor parallelism, only its
slice of each, so its peak host memory is its shard. Every element read must end up in the rank's
parameters (nothing is read and dropped), and the ranks of a layout together read each layer tensor
once, up to what tensor parallelism replicates (norms, the row-parallel layers' biases)."""

from __future__ import annotations

import math
from pathlib import Path

import conveyor.inference.model.loader as loader
import pytest
import torch
from conveyor.inference.model.families import load_arch
from conveyor.inference.model.loader import Shard, load_stage
from conveyor.testing.tiny import save_tiny
from safetensors import safe_open

STAGES, TP = 2, 2


def _checkpoint_numel(model_dir: Path) -> dict[str, int]:
    out = {}
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                out[key] = math.prod(f.get_slice(key).get_shape())
    return out


class _CountingSlice:
    def __init__(self, name: str, sl, reads: list[tuple[str, int]]):  # type: ignore[no-untyped-def]
        self.name, self.sl, self.reads = name, sl, reads

    def get_shape(self) -> list[int]:
        return self.sl.get_shape()

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        tensor = self.sl[index]
        self.reads.append((self.name, tensor.numel()))
        return tensor


class _CountingHandle:
    """A safetensors handle that records the elements each slice read brings into memory."""

    def __init__(self, handle, reads: list[tuple[str, int]]):  # type: ignore[no-untyped-def]
        self.handle, self.reads = handle, reads

    def __enter__(self) -> _CountingHandle:
        self.handle.__enter__()
        return self

    def __exit__(self, *exc) -> None:  # type: ignore[no-untyped-def]
        self.handle.__exit__(*exc)

    def keys(self) -> list[str]:
        return list(self.handle.keys())

    def get_slice(self, name: str) -> _CountingSlice:
        return _CountingSlice(name, self.handle.get_slice(name), self.reads)

    def get_tensor(self, name: str) -> torch.Tensor:
        tensor = self.handle.get_tensor(name)
        self.reads.append((name, tensor.numel()))
        return tensor


@pytest.fixture
def reads(monkeypatch) -> list[tuple[str, int]]:
    """(tensor name, elements) of every read the loader makes from now on."""
    out: list[tuple[str, int]] = []
    monkeypatch.setattr(loader, "safe_open", lambda *a, **k: _CountingHandle(safe_open(*a, **k), out))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2", "opt"])
def test_each_rank_reads_its_shard_and_nothing_else(family: str, tmp_path: Path, reads) -> None:
    model_dir = save_tiny(family, tmp_path, tokenizer=False)
    arch = load_arch(model_dir)
    stored = _checkpoint_numel(model_dir)
    layer_total = sum(n for k, n in stored.items() if ".layers." in k or ".h." in k)
    per_rank_layers = []
    for stage in range(STAGES):
        for tp_rank in range(TP):
            reads.clear()
            model = load_stage(model_dir, arch, stages=STAGES, stage=stage, shard=Shard(tp_rank, TP))
            held = sum(p.numel() for p in model.parameters())
            # Every element read is held: a whole tensor read to keep a slice would show here.
            assert sum(n for _, n in reads) == held, (stage, tp_rank)
            per_rank_layers.append(
                sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers."))
            )
    # Each rank holds a quarter of the layers' elements, plus the replicated norms and biases: well under
    # the half it would hold if tensor parallelism read whole tensors.
    replicated_bound = 0.25 * layer_total + 0.1 * layer_total
    assert max(per_rank_layers) < replicated_bound, (per_rank_layers, layer_total)
    assert sum(per_rank_layers) >= layer_total  # nothing is missing: every layer tensor is somewhere


def test_a_whole_model_rank_reads_every_tensor_once(tmp_path: Path, reads) -> None:
    model_dir = save_tiny("llama", tmp_path, tokenizer=False)
    load_stage(model_dir, load_arch(model_dir), dtype=torch.float32)
    seen = [name for name, _ in reads]
    stored = set(_checkpoint_numel(model_dir))
    assert sorted(seen) == sorted(set(seen)), "a tensor was read twice"
    assert set(seen) == stored - {"lm_head.weight"} or set(seen) == stored


def test_a_long_load_logs_its_progress_to_the_whole_shard(tmp_path: Path, monkeypatch, caplog) -> None:
    """Every due "loading weights" line counts more bytes than the last, and the last is the whole shard
    (a tied head, which is the embedding, is not counted twice)."""
    import logging

    monkeypatch.setattr(loader, "LOAD_LOG_SECONDS", 0.0)  # a line at every tensor
    for family, overrides in [("llama", {}), ("llama", {"tie_word_embeddings": True})]:
        model_dir = save_tiny(family, tmp_path / str(len(overrides)), tokenizer=False, **overrides)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="conveyor.loader"):
            model = load_stage(model_dir, load_arch(model_dir), dtype=torch.float32)
        lines = [r for r in caplog.records if r.getMessage() == "loading weights"]
        assert len(lines) > 3
        percents = [r.percent for r in lines]  # type: ignore[attr-defined]
        assert percents == sorted(percents) and percents[-1] == 100.0, (overrides, percents)
        assert all(r.eta_seconds >= 0 for r in lines)  # type: ignore[attr-defined]
        assert model is not None


def test_no_progress_line_before_its_interval(monkeypatch) -> None:
    now = [0.0]
    progress = loader.LoadProgress(1000, every=10.0, clock=lambda: now[0])
    logged: list[dict] = []
    monkeypatch.setattr(loader.log, "info", lambda msg, extra: logged.append(extra))
    now[0] = 4.0
    progress.add(300)
    assert logged == []
    now[0] = 10.0
    progress.add(200)  # 500 of 1000 bytes in 10 s: 10 s left
    assert logged[-1]["percent"] == 50.0 and logged[-1]["eta_seconds"] == 10.0
