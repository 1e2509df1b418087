"""On a CUDA device: greedy tokens equal HF's (fp32), and bf16/fp16 generation runs (skipped without a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conveyor.inference.kernels.cuda_graphs import CompiledStage
from conveyor.inference.pipeline.generate import Request
from conveyor.inference.pipeline.sampling import SamplingParams
from conveyor.testing.reference import one_process_rank
from conveyor.testing.tiny import save_tiny

from tests.worker.inference.generation import output_ids

pytestmark = pytest.mark.gpu
PROMPTS = [[5, 6, 7, 8, 9, 10], [20, 21, 22], [30]]


def generate(d: Path, dtype: torch.dtype) -> list[list[int]]:
    dev = torch.device("cuda")
    model, peers = one_process_rank(d, dtype=dtype, device=dev, lanes=4, max_len=32)
    requests = [Request(i, p, 8) for i, p in enumerate(PROMPTS)]
    got = output_ids(
        model,
        peers,
        SamplingParams(stop_token_ids=(2,)),
        requests,
        micro_batches=2,
        lanes_per_micro_batch=2,
        device=dev,
    )
    return [got[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_cuda_greedy_matches_hf(tmp_path: Path, family: str) -> None:
    import transformers as T

    d = save_tiny(family, tmp_path, tokenizer=False)
    hf = T.AutoModelForCausalLM.from_pretrained(d).cuda().eval()
    want = [
        hf.generate(
            torch.tensor([p], device="cuda"),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
        )[0, len(p) :].tolist()
        for p in PROMPTS
    ]
    assert generate(d, torch.float32) == want
    for dtype in (torch.bfloat16, torch.float16):
        assert all(1 <= len(o) <= 8 for o in generate(d, dtype))


def test_compiled_prompt_passes_give_eager_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts through the compiled prompt pass (prompts of 1, 5 and 77 tokens prefilled together, one of
    300 in chunks of 128: a prefill, then extends) give eager's greedy tokens, in two generations on one
    model and after its cache is replaced (the captured decode graphs wrote the old one)."""
    d = save_tiny("llama", tmp_path, tokenizer=False)
    dev = torch.device("cuda")
    prompts = [[7], [5, 6, 7, 8, 9], list(range(3, 80)), [(i * 7) % 90 + 3 for i in range(300)]]

    def tokens(model: object, peers: object) -> list[list[int]]:
        requests = [Request(i, p, 6) for i, p in enumerate(prompts)]
        got = output_ids(
            model, peers, SamplingParams(), requests, lanes_per_micro_batch=4, device=dev, prefill_chunk=128
        )  # type: ignore[arg-type]
        return [got[i] for i in range(len(prompts))]

    monkeypatch.setenv("CONVEYOR_TORCH_COMPILE", "0")
    eager = tokens(*one_process_rank(d, device=dev, lanes=4, max_len=320))
    monkeypatch.setenv("CONVEYOR_TORCH_COMPILE", "1")
    model, peers = one_process_rank(d, device=dev, lanes=4, max_len=320)
    assert tokens(model, peers) == eager
    assert tokens(model, peers) == eager
    model.setup_cache(4, 320, torch.float32, dev)
    assert tokens(model, peers) == eager
    assert not CompiledStage.of(model).uncompiled, "a pass fell back to eager: see the warning logged"


def test_a_cache_larger_than_the_gpu_is_refused_before_it_is_allocated(tmp_path: Path) -> None:
    from conveyor.inference.validate import InputError

    d = save_tiny("llama", tmp_path, tokenizer=False)
    free = torch.cuda.mem_get_info()[0]
    lanes = 1 << 20  # a million lanes of 4,096 positions: far past any card
    with pytest.raises(InputError, match="lower the lanes to"):
        one_process_rank(d, dtype=torch.bfloat16, device=torch.device("cuda"), lanes=lanes, max_len=4096)
    assert torch.cuda.mem_get_info()[0] >= free - (256 << 20)  # refused, not half-allocated
