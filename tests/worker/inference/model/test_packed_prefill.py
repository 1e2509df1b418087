"""A prefill of several prompts packed into one row (StageModel.packed_attention, packed_attention.py)
gives what the padded pass gives: each prompt's last logits, the KV cache of every real token, the
decode steps after it, a first stage's hidden states at the real tokens, and the same generated tokens
through the scheduler; on the CPU, in float32, where attention runs per prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conveyor.inference.kernels import packed_attention
from conveyor.inference.model.families import load_arch
from conveyor.inference.model.loader import load_stage
from conveyor.inference.pipeline.generate import Request
from conveyor.inference.pipeline.sampling import SamplingParams
from conveyor.testing.reference import one_process_rank
from conveyor.testing.tiny import save_tiny

from tests.worker.inference.generation import output_ids

LENGTHS = [7, 2, 5, 1]  # right-padded to 7: 10 of the pass's 28 tokens are padding
MAX_LEN = 24


def padded_prefill(scratch: int, lanes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    s = max(LENGTHS)
    tokens = torch.zeros(len(LENGTHS), s, dtype=torch.int64)
    positions = torch.full((len(LENGTHS), s), scratch)
    for i, n in enumerate(LENGTHS):
        tokens[i, :n] = torch.randint(3, 100, (n,), generator=gen)
        positions[i, :n] = torch.arange(n)
    return tokens, positions, torch.tensor(lanes)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "mistral"])
def test_a_packed_prefill_gives_the_padded_passs_logits_cache_and_decode(tmp_path: Path, family: str) -> None:
    model_dir = save_tiny(family, tmp_path, tokenizer=False)
    runs = []
    calls: list[int] = []
    for packed in (False, True):
        model, _ = one_process_rank(model_dir, lanes=6, max_len=MAX_LEN)
        if packed:

            def attend(*args, **kwargs):  # type: ignore[no-untyped-def]
                calls.append(1)
                return packed_attention.attend(*args, **kwargs)

            model.packed_attention = attend
        assert model.cache is not None
        tokens, positions, lanes = padded_prefill(model.cache.scratch_position, [5, 0, 3, 1])
        with torch.inference_mode():
            first = model(tokens, positions, prefill=True, lanes=lanes)
            cache = [t[lanes].clone() for t in model.cache.tensors()]  # the scratch slot aside
            steps = []
            at = torch.tensor(LENGTHS)[:, None]
            for k in range(3):  # decode steps read what the prefill wrote
                step_tokens = torch.full((len(LENGTHS), 1), 7 + k)
                steps.append(model(step_tokens, at + k, lanes=lanes, kv_len=MAX_LEN))
        runs.append((first, cache, steps))
    assert calls, "the packed attention was never called"
    (first, cache, steps), (p_first, p_cache, p_steps) = runs
    torch.testing.assert_close(p_first, first, rtol=1e-5, atol=1e-5)
    for want, got in zip(cache, p_cache, strict=True):
        torch.testing.assert_close(got[..., :-1, :], want[..., :-1, :], rtol=1e-5, atol=1e-5)
    for want, got in zip(steps, p_steps, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_first_stage_sends_the_padded_shape_with_its_real_rows(tmp_path: Path) -> None:
    model_dir = save_tiny("llama", tmp_path, tokenizer=False)
    arch = load_arch(str(model_dir))
    outs = []
    for packed in (False, True):
        stage = load_stage(str(model_dir), arch, stages=2, stage=0)
        stage.setup_cache(6, MAX_LEN, torch.float32, torch.device("cpu"))
        stage.packed_attention = packed_attention.attend if packed else None
        tokens, positions, lanes = padded_prefill(MAX_LEN, [0, 1, 2, 3])
        with torch.inference_mode():
            outs.append(stage(tokens, positions, prefill=True, lanes=lanes))
    real = positions < MAX_LEN
    assert outs[1].shape == outs[0].shape
    torch.testing.assert_close(outs[1][real], outs[0][real], rtol=1e-5, atol=1e-5)
    assert outs[1][~real].eq(0).all()  # the padding carries nothing


def test_generation_with_packed_prefills_gives_the_same_tokens(tmp_path: Path) -> None:
    """Through the scheduler: prompts of 1-40 tokens joining in waves, prefilled together."""
    model_dir = save_tiny("llama", tmp_path, tokenizer=False)
    gen = torch.Generator().manual_seed(3)
    prompts = [
        torch.randint(3, 100, (int(n),), generator=gen).tolist()
        for n in torch.randint(1, 41, (20,), generator=gen)
    ]
    got = []
    for packed in (False, True):
        model, peers = one_process_rank(model_dir, lanes=8, max_len=64)
        model.packed_attention = packed_attention.attend if packed else None
        requests = [Request(i, p, 6) for i, p in enumerate(prompts)]
        got.append(output_ids(model, peers, SamplingParams(), requests, lanes_per_micro_batch=8))
    assert got[1] == got[0] and len(got[0]) == 20


def test_a_pass_with_a_row_of_padding_only_stays_padded(tmp_path: Path) -> None:
    """Warm-up's passes sit wholly at the scratch slot: nothing to pack, and the padded pass runs."""
    model_dir = save_tiny("llama", tmp_path, tokenizer=False)
    model, _ = one_process_rank(model_dir, lanes=6, max_len=MAX_LEN)
    calls: list[int] = []
    model.packed_attention = lambda *a, **k: calls.append(1) or packed_attention.attend(*a, **k)
    tokens, positions, lanes = padded_prefill(MAX_LEN, [0, 1, 2, 3])
    positions[2] = MAX_LEN  # the third row: padding only
    with torch.inference_mode():
        logits = model(tokens, positions, prefill=True, lanes=lanes)
    assert logits.shape == (4, model.arch.vocab_size) and not calls
