"""Token sampling that gives the same tokens for any layout.

Randomness is a pure function of (seed, sequence key, step, token id): a counter-based hash (murmur3's
32-bit finaliser on int64 tensors) turned into Gumbel noise, and ``argmax(logits / T + gumbel)`` draws
from softmax(logits / T). No generator state is shared between sequences, so how sequences are grouped
into micro-batches, lanes, stages or ranks cannot change what any of them draws, on the CPU or a GPU.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

_M32 = 0xFFFFFFFF
# A temperature below this samples as greedy (vLLM's threshold): logits / T overflows float32 long before T
# reaches 0 (at 1e-40 every positive logit was +inf, and the draw the first of them), and below it the
# draw is the argmax but for logits within a few 1e-4 of each other.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 (below GREEDY_BELOW): greedy
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = field(default=())

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def sequence_key(request_id: object) -> int:
    """A stable 32-bit key of a request id (the same in every process and run)."""
    return zlib.crc32(str(request_id).encode()) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # int64 holding uint32 values; products may wrap in int64, the low 32 bits stay exact.
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def counter_uniform(seed: int, seq_keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) noise [n, vocab], a function of (seed, seq_keys[i], steps[i], token id) only."""
    key = _fmix32(torch.full_like(seq_keys, seed & _M32))
    key = _fmix32(key ^ (seq_keys & _M32))
    key = _fmix32(key ^ (steps & _M32))  # [n]
    token = _fmix32(torch.arange(vocab, device=seq_keys.device, dtype=torch.int64) + 0x9E3779B9)  # [vocab]
    h = _fmix32(key[:, None] ^ token[None, :])  # [n, vocab]
    return ((h >> 8).float() + 0.5) / float(1 << 24)  # 24 random bits: exact in float32, never 0 or 1


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's rule: a seen token's logit is divided by the penalty if positive, multiplied if negative."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [n, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the mass before it already reaches top_p (the most likely one always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        # the comparison is in float32, where a top_p under 1.4e-45 is 0: the mass before the most likely
        # token (0) reached it, and every token was dropped
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    seq_keys: torch.Tensor,
    steps: torch.Tensor,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [n, vocab] float32 -> tokens [n] int64."""
    if seen is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    gumbel = -torch.log(-torch.log(counter_uniform(params.seed, seq_keys, steps, logits.shape[-1])))
    return (logits + gumbel).argmax(dim=-1)
