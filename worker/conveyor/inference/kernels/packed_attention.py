"""Causal attention over prompts packed into one row, for the eager prompt passes.

A prompt pass of several prompts pads each to the longest: with prompts of 32-255 tokens, grouped
longest first, 13% of a batch job's prefill tokens were padding (docs/performance.md), computed by
every product and elementwise kernel for nothing. Packed, a pass computes only its prompts' tokens:
the model gathers them into one row (StageModel.forward), and attention keeps each prompt to its own
keys through the prompts' cumulative lengths (flash attention's variable-length form, torch's
``varlen_attn``, which takes grouped-query heads as they are). Where that kernel does not serve (the
CPU, float32, a GPU without flash attention) each prompt runs SDPA on its own slice: the same
attention, in as many calls as prompts.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

# varlen_attn logs its backend at INFO on every call: a line per layer per pass in a job's log
logging.getLogger("torch.nn.attention.varlen").setLevel(logging.WARNING)


def _flash_serves(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, longest: int, scale: float
) -> torch.Tensor:
    """q [T, heads, D], k and v [T, kv_heads, D] of prompts packed one after another (prompt i holds
    tokens ``cu_seqlens[i]:cu_seqlens[i + 1]``, int32, on q's device), each from position 0 ->
    [T, heads, D], causal within each prompt. ``longest``: at least the longest prompt's length."""
    if _flash_serves(q):
        try:
            from torch.nn.attention.varlen import varlen_attn

            out = varlen_attn(
                q, k, v, cu_seqlens, cu_seqlens, longest, longest, scale=scale, window_size=(-1, 0)
            )
            assert isinstance(out, torch.Tensor)
            return out
        except (ImportError, RuntimeError) as err:  # a build without flash attention's varlen kernel
            _warn_once(err)
    gqa = k.shape[1] != q.shape[1]
    bounds = cu_seqlens.tolist()
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        # [1, heads, L, D] each: SDPA's layout
        qi, ki, vi = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        y = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=gqa)
        pieces.append(y[0].transpose(0, 1))
    return torch.cat(pieces)


_warned: list[str] = []


def _warn_once(err: Exception) -> None:
    if not _warned:
        _warned.append(str(err))
        logging.getLogger(__name__).warning(
            "flash attention's variable-length kernel is not available (%s): packed prompts run "
            "SDPA one prompt at a time",
            err,
        )
