"""On a GPU (compute capability 8.9+): a float8 KV cache through the path a job runs (the decode step
compiled and replayed from a CUDA graph, the Triton attention kernel reading float8 and its scales)
gives the tokens of the eager path on the same cache (SDPA on the widened values), on SmolLM2-135M in
bf16, whose logits have clear winners."""

from __future__ import annotations

import pytest
import torch
from conveyor.inference.kernels.cuda_graphs import EAGER, CompileOptions
from conveyor.inference.pipeline.generate import Request
from conveyor.inference.pipeline.sampling import SamplingParams
from conveyor.inference.rank_builder import build_generation_rank
from conveyor.topology import Layout, Topology

from tests.worker.inference.generation import output_ids

pytestmark = pytest.mark.gpu
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "A pipeline of GPUs"]
NEW = 16


def test_float8_cache_compiled_and_graphed_gives_the_eager_tokens() -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability 8.9 (Ada, Hopper) or newer")
    import transformers as T
    from conveyor import smollm2

    d = smollm2.checkpoint()
    tok = T.AutoTokenizer.from_pretrained(d)
    dev = torch.device("cuda")
    requests = [Request(i, tok(p)["input_ids"], NEW) for i, p in enumerate(PROMPTS)]
    got = {}
    for name, options in [("compiled", CompileOptions.from_env(dev)), ("eager", EAGER)]:
        rank = build_generation_rank(
            str(d),
            Topology(Layout(), rank=0, world_size=1),
            dtype=torch.bfloat16,
            device=dev,
            micro_batches=1,
            lanes_per_micro_batch=4,
            max_len=64,
            options=options,
            kv_cache_dtype="fp8",
        )
        assert rank.model.cache is not None and rank.model.cache.k[0].dtype == torch.float8_e4m3fn
        got[name] = output_ids(
            rank.model, rank.peers, SamplingParams(), requests, lanes_per_micro_batch=4, device=dev
        )
        if name == "compiled":
            assert rank.compiled.graphs and not rank.compiled.uncompiled
            assert rank.compiled.counts["late_compiles"] == rank.compiled.counts["late_captures"] == 0
    # bf16 rounds differently on the two paths: a near-tie may part them late, never early
    for i in range(len(PROMPTS)):
        assert got["compiled"][i][:4] == got["eager"][i][:4], (PROMPTS[i], got)
    assert sum(got["compiled"][i] == got["eager"][i] for i in range(len(PROMPTS))) >= 3, got
