"""CompiledStage's bookkeeping and warm-up, which run on the CPU too: compiling with inductor's CPU
backend (CUDA graphs need a GPU: test_gpu.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conveyor.inference.kernels import compile_cache
from conveyor.inference.kernels.cuda_graphs import CompiledStage, CompileOptions
from conveyor.inference.pipeline.generate import Request
from conveyor.inference.pipeline.sampling import SamplingParams
from conveyor.testing.reference import one_process_rank
from conveyor.testing.tiny import save_tiny

from tests.worker.inference.generation import output_ids


def test_one_compiled_stage_per_model_whose_graphs_go_when_the_weights_move(tmp_path: Path) -> None:
    model, _ = one_process_rank(save_tiny("llama", tmp_path, tokenizer=False), lanes=2, max_len=16)
    stage = CompiledStage.of(model)
    assert CompiledStage.of(model) is stage
    stage._graphs[((2, 1), torch.int64)] = object()  # type: ignore[assignment] (as if captured)
    CompiledStage.of(model)
    assert stage._graphs, "the same weights keep their graphs"
    model.to(torch.bfloat16)  # new storage: a captured graph would read the freed float32 weights
    assert CompiledStage.of(model) is stage and not stage._graphs


@pytest.mark.integration
@pytest.mark.parametrize("variant", ["llama", "mistral", "llama-fp8"])  # mistral: a window of 8 positions
def test_after_warm_up_nothing_compiles_whatever_the_prompt_lengths(tmp_path: Path, variant: str) -> None:
    """Warm-up compiles the decode step and the prompt layer; then a run whose prompts are 1 to 40
    tokens long (some in chunks, one and several joining at once) and whose context sweeps the whole
    cache compiles nothing more (the stance makes a recompile an error), and gives eager's tokens
    (fp8: both on a float8 KV cache, whose writes and reads are compiled too)."""
    compile_cache.configure(tmp_path / "cache")
    family, _, kv = variant.partition("-")
    kv_cache_dtype = kv or "auto"
    model_dir = save_tiny(family, tmp_path / "model", tokenizer=False)
    lanes, max_len = 4, 48
    rng = random.Random(0)
    lengths = [1, 2, 40, 3, 17, 1, 33, 9, 25, 2]
    requests = [
        Request(i, [rng.randrange(1, 100) for _ in range(n)], max_len - n) for i, n in enumerate(lengths)
    ]
    eager_model, peers = one_process_rank(
        model_dir, lanes=lanes, max_len=max_len, kv_cache_dtype=kv_cache_dtype
    )
    want = output_ids(
        eager_model,
        peers,
        SamplingParams(),
        requests,
        lanes_per_micro_batch=2,
        micro_batches=2,
        prefill_chunk=16,
    )

    model, peers = one_process_rank(model_dir, lanes=lanes, max_len=max_len, kv_cache_dtype=kv_cache_dtype)
    options = CompileOptions(
        cuda_graphs=False, compile=True, triton_kernels=False, after_warm_up="fail_on_recompile"
    )
    stage = CompiledStage.attach(model, options)
    report = stage.warm_up(2)
    # decode once; prompt layer: a prefill and a later chunk, each of one prompt and of several
    assert report.compiles >= 2, report
    assert set(report.seconds) == {"tune", "compile"}, report.seconds
    got = output_ids(
        model, peers, SamplingParams(), requests, lanes_per_micro_batch=2, micro_batches=2, prefill_chunk=16
    )
    assert stage.counts["late_compiles"] == 0, stage.counts
    assert not stage.uncompiled
    assert got == want


def test_eager_warm_up_loads_the_packed_attention_kernel_without_writing_the_cache(tmp_path: Path) -> None:
    """Flash attention's variable-length kernel loads on its first call (seconds on a GPU): warm-up
    calls the packed attention once, as a pass of two prompts would, and the cache stays untouched."""
    from conveyor.inference.kernels import packed_attention

    model, _ = one_process_rank(save_tiny("llama", tmp_path, tokenizer=False), lanes=2, max_len=16)
    calls: list[tuple[int, ...]] = []

    def attend(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(tuple(q.shape))
        return packed_attention.attend(q, *args, **kwargs)  # type: ignore[arg-type]

    model.packed_attention = attend
    assert model.cache is not None
    for k in model.cache.k:
        k.fill_(7.0)
    stage = CompiledStage.attach(
        model, CompileOptions(cuda_graphs=False, compile=False, triton_kernels=False)
    )
    stage.warm_up(2)
    arch = model.arch
    assert calls == [(2, arch.heads, arch.head_dim)]
    assert all(bool((k[:, :, :-1] == 7.0).all()) for k in model.cache.k), "a real cache slot was written"
