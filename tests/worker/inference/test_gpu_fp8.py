"""On a GPU (compute capability 8.9+): a float8 KV cache through the path a job runs (the decode step
compiled and replayed from a CUDA graph, the Triton attention kernel reading float8 and its scales)
gives the logits of the eager path on the same kind of cache (SDPA on the widened values), step by
step along the same tokens; both are bf16, so they agree to bf16's rounding, not bit for bit
(they round at different points: the kernel scales the scores and probabilities in float32, eager
rounds each widened value to bf16). Measured on an H200: 1.1% of the largest logit at most, 0.3% for
a bf16 cache, with HF's initializer range; the test models' own (0.3) make attention so peaked that
any rounding moves the logits by 15%, a bf16 cache's against a float8 one's by 69%."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conveyor.inference.kernels.cuda_graphs import EAGER, CompileOptions
from conveyor.inference.rank_builder import build_generation_rank
from conveyor.testing.tiny import save_tiny
from conveyor.topology import Layout, Topology

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


def forced_logits(model_dir: Path, options: CompileOptions, kv_cache_dtype: str) -> torch.Tensor:
    """[steps, 2, vocab]: a prefill of two prompts, then decode steps along fixed tokens."""
    dev = torch.device(DEVICE)
    rank = build_generation_rank(
        str(model_dir),
        Topology(Layout(), rank=0, world_size=1),
        dtype=torch.bfloat16,
        device=dev,
        micro_batches=1,
        lanes_per_micro_batch=2,
        max_len=64,
        options=options,
        kv_cache_dtype=kv_cache_dtype,
    )
    stage = rank.compiled
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 100, (2, 9), generator=gen).to(dev)
    steps = torch.randint(3, 100, (2, 24), generator=gen).to(dev)
    lanes = torch.arange(2, device=dev)
    with torch.inference_mode():
        out = [stage.prompt(prompt, torch.arange(9, device=dev).expand(2, 9), lanes, prefill=True).clone()]
        for t in range(steps.shape[1]):
            positions = torch.full((2, 1), 9 + t, device=dev)
            out.append(stage.decode(steps[:, t : t + 1], positions, lanes, 64).clone())
    if options is not EAGER and dev.type == "cuda":
        assert stage.graphs and not stage.uncompiled and rank.model.decode_kernel is not None
        assert stage.counts["late_compiles"] == stage.counts["late_captures"] == 0
    return torch.stack(out).float()


def test_float8_cache_compiled_and_graphed_gives_the_eager_logits(tmp_path: Path) -> None:
    if DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability 8.9 (Ada, Hopper) or newer")
    # GQA (4 heads on 2 KV heads), head_dim 32: the Triton kernel serves it (a power of two, >= 16)
    model_dir = save_tiny(
        "llama", tmp_path, tokenizer=False, hidden_size=128, head_dim=32, initializer_range=0.02
    )
    fast = forced_logits(model_dir, CompileOptions.from_env(torch.device(DEVICE)), "fp8")
    eager = forced_logits(model_dir, EAGER, "fp8")
    bf16_cache = forced_logits(model_dir, EAGER, "auto")
    scale = eager.abs().amax(-1, keepdim=True)
    assert ((fast - eager).abs() / scale).max() < 0.03  # bf16 noise of a random-weight model
    assert ((bf16_cache - eager).abs() / scale).max() > 0  # (the float8 rounding is there)
