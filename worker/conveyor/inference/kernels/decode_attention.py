"""Decode attention on the GPU: one query token per sequence against its KV cache, split over the keys.

A decode step's attention reads each sequence's K and V once; everything else is small. Written as
broadcast-multiply-sum for inductor (model.decode_attention) it read K at 1.2 TB/s at batch 16 on an
H200 (q.k fused with the softmax statistics, 17 us a layer) and V at 2.1 TB/s at batch 64: 0.75 ms of
a 4.9 ms step where reading the cache once takes 0.28. This is flash decoding: a program per
(sequence, KV head, key split) loads the query heads that share the KV head (GQA folded into the rows
of one tensor-core dot), streams its keys in blocks with an online softmax, and writes a partial
output with its running max and sum; a second kernel combines the splits. The splits are as many as
keep every SM busy at small batches. Rounding follows flash attention's: scores and softmax in
float32, probabilities rounded to the query's dtype before p.v, p.v accumulated in float32. A float8
cache (kv_cache.py) is read as float8, half the bytes, and widened to the query's dtype in registers;
its per-vector scales multiply the scores' columns (q.(s k) = s (q.k)) and the probabilities before
p.v (p.(s v) = (p s).v), so no dequantized tile is ever made.

Which keys a query sees follows from its position (cache slot i holds position i): slots up to the
position, within the sliding window if the model has one. A query at the cache's last slot (kv_cache's
scratch slot, where an idle lane of a decode step sits) sees none and gets zeros: a captured step
sizes its reads for the whole cache, so an idle lane that saw "up to its position" read its whole lane
(a 7B serve replica of 32 lanes and 4,096 positions, one request: 19.8 ms a token instead of 4). Computed in the kernel rather than read from
a mask, no load of K or V waits on another load, so the pipeline keeps them in flight from the first
block: 1.60 -> 1.51 ms a step for the 32 layers at batch 64 (context 161), 0.51 -> 0.48 at batch 16.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

TARGET_PROGRAMS = 264  # two per SM of an H100/H200: enough loads in flight to reach HBM bandwidth
# (keys per block, warps) of a 16-bit cache and of a float8 one (scaled). Swept on an H100 at a batch
# job's shapes (benchmarks/decode_attention_sweep.py: 256 lanes at positions 32-383, 64 lanes at
# 1,000-2,000): the 16-bit tiles of 16-128 keys and 1-8 warps tried read at 94-99% of the copy
# bandwidth but one (128 keys, 4 warps, 3 stages: 82%), so it keeps its first choice. The float8 one
# took 0.337 ms a layer at 64 keys and 4 warps (slower than the 16-bit cache's 0.291) and 0.230 at 32
# keys and one warp (0.485 -> 0.385 ms at 1,000-2,000): likely because a dot of one warp takes its
# operands from registers, where one of four warps on Hopper (wgmma) reads them from shared memory, so
# the widened tile went back through it.
TILES = {False: (64, 4), True: (32, 1)}
# Loads in flight per program: a third stage pays once a split has more blocks than the pipeline fills
# (context 1,000 at batch 64: 1.99 -> 1.92 ms a step), and costs where it has few (batch 16, context
# 161: 0.48 -> 0.56 ms: the shared memory of a third stage leaves fewer programs on each SM). A float8
# tile of one warp is small enough that three always pay (two or four: 7% and 12% slower at 32-383).
DEEP_BLOCKS = 4


def stages(blocks_per_split: int, scaled: bool = False) -> int:
    return 3 if scaled or blocks_per_split > DEEP_BLOCKS else 2


def available(q: torch.Tensor) -> bool:
    """Whether the kernel serves this query: CUDA, 16-bit, a power-of-two head size (the tile width)."""
    d = q.shape[-1]
    return (
        triton is not None
        and q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)  # float32 stays exact (no TF32 dots)
        and d >= 16
        and d & (d - 1) == 0
    )


def split_keys(n: int, kv_heads: int, kv_len: int, block_l: int) -> tuple[int, int]:
    """(splits, key blocks per split): enough programs for the GPU, and no split without a key block."""
    blocks = triton.cdiv(kv_len, block_l)
    per_split = triton.cdiv(blocks, max(1, min(blocks, triton.cdiv(TARGET_PROGRAMS, n * kv_heads))))
    return triton.cdiv(blocks, per_split), per_split


if triton is not None:

    @triton.jit
    def _split_kernel(
        q_ptr,  # [n, heads, D]
        k_ptr,  # [lanes, kv_heads, Lmax, D]: a layer's whole cache
        v_ptr,
        ks_ptr,  # [lanes, kv_heads, Lmax] float32: a float8 cache's key scales (SCALED)
        vs_ptr,
        pos_ptr,  # [n] the query's position: it sees cache slots [0, pos] (and > pos - WINDOW)
        lanes_ptr,  # [n] the cache lane of each query
        acc_ptr,  # [n, heads, SPLITS, D] float32, normalised within the split
        stats_ptr,  # [n, heads, SPLITS, 2] float32: the split's max score and its sum of exp
        out_ptr,  # [n, heads, D] in q's dtype: written here when SPLITS == 1 (nothing to combine)
        kv_len,
        scratch,  # the cache's last slot: a query there is an idle lane's and sees no key
        scale,
        stride_qn,
        stride_qh,
        stride_kl,
        stride_kh,
        stride_kp,
        stride_vl,
        stride_vh,
        stride_vp,
        stride_sl,  # the scales' lane and head strides (both scale tensors are laid out alike)
        stride_sh,
        stride_pn,
        stride_ln,
        KV_HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        D: tl.constexpr,
        BLOCK_L: tl.constexpr,
        SPLITS: tl.constexpr,
        BLOCKS_PER_SPLIT: tl.constexpr,
        WINDOW: tl.constexpr,  # 0: no sliding window
        SCALED: tl.constexpr,  # a float8 cache with a scale per key and value vector
        STATIC_LOOP: tl.constexpr,
    ):
        seq = tl.program_id(0) // KV_HEADS
        kv_head = tl.program_id(0) % KV_HEADS
        split = tl.program_id(1)
        rows = tl.arange(0, BLOCK_G)  # the query heads of this KV head (HF's repeat_kv order)
        row_ok = rows < GROUP
        heads = kv_head * GROUP + rows
        dims = tl.arange(0, D)
        q = tl.load(
            q_ptr + seq * stride_qn + heads[:, None] * stride_qh + dims[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        lane = tl.load(lanes_ptr + seq * stride_ln)
        pos = tl.load(pos_ptr + seq * stride_pn)
        k_base = k_ptr + lane * stride_kl + kv_head * stride_kh
        v_base = v_ptr + lane * stride_vl + kv_head * stride_vh
        scales = lane * stride_sl + kv_head * stride_sh
        m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, D), dtype=tl.float32)
        first = split * BLOCKS_PER_SPLIT * BLOCK_L
        # The loop ends at the query's own last block: splits are sized for the whole cache (kv_len is
        # fixed when a step is captured), and a split past the position costs a program that exits.
        last = tl.where(pos == scratch, 0, tl.minimum(pos + 1, kv_len))
        blocks = tl.minimum(tl.maximum(tl.cdiv(last - first, BLOCK_L), 0), BLOCKS_PER_SPLIT)
        # Triton's interpreter takes only static bounds; the masks give the same result
        for b in tl.range(0, BLOCKS_PER_SPLIT if STATIC_LOOP else blocks):
            keys = first + b * BLOCK_L + tl.arange(0, BLOCK_L)
            # Only visible keys are read: a masked-off row of K or V costs no HBM traffic.
            # The rule of StageModel.forward's mask (which the other attention paths read): change both.
            visible = keys < last
            if WINDOW > 0:
                visible &= keys > pos - WINDOW
            k = tl.load(k_base + keys[:, None] * stride_kp + dims[None, :], mask=visible[:, None], other=0.0)
            k = k.to(q.dtype)  # a float8 cache widened in registers (no-op for a cache in q's dtype)
            scores = tl.dot(q, tl.trans(k)) * scale  # [BLOCK_G, BLOCK_L] in float32
            if SCALED:
                scores *= tl.load(ks_ptr + scales + keys, mask=visible, other=0.0)[None, :]
            scores = tl.where(visible[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: keep zeros
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + keys[:, None] * stride_vp + dims[None, :], mask=visible[:, None], other=0.0)
            if SCALED:
                p_v = p * tl.load(vs_ptr + scales + keys, mask=visible, other=0.0)[None, :]
            else:
                p_v = p
            acc = acc * alpha[:, None] + tl.dot(p_v.to(q.dtype), v.to(q.dtype))
            m_i = m_new
        if SPLITS == 1:  # the combine of one split is a division: done here, one kernel fewer per layer
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            out_ptrs = out_ptr + (seq * KV_HEADS * GROUP + heads)[:, None] * D + dims[None, :]
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
            return
        out_rows = (seq * KV_HEADS * GROUP + heads) * SPLITS + split
        tl.store(acc_ptr + out_rows[:, None] * D + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(stats_ptr + out_rows * 2, m_i, mask=row_ok)
        tl.store(stats_ptr + out_rows * 2 + 1, l_i, mask=row_ok)

    @triton.jit
    def _combine_kernel(
        acc_ptr, stats_ptr, out_ptr, D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr
    ):
        row = tl.program_id(0)  # one (sequence, head)
        splits = tl.arange(0, BLOCK_S)
        split_ok = splits < SPLITS
        m = tl.load(stats_ptr + (row * SPLITS + splits) * 2, mask=split_ok, other=float("-inf"))
        s = tl.load(stats_ptr + (row * SPLITS + splits) * 2 + 1, mask=split_ok, other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.where(split_ok & (m > float("-inf")), tl.exp(m - m_max), 0.0)
        dims = tl.arange(0, D)
        acc = tl.load(
            acc_ptr + (row * SPLITS + splits)[:, None] * D + dims[None, :], mask=split_ok[:, None], other=0.0
        )
        total = tl.sum(s * w, axis=0)  # 0 for a query that saw no key (an idle lane's): zeros out
        out = tl.sum(acc * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
        tl.store(out_ptr + row * D + dims, out.to(out_ptr.dtype.element_ty))


@torch.library.custom_op("conveyor::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    lanes: torch.Tensor,
    kv_len: int,
    window: int,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [n, heads, 1, D] at ``positions`` [n, 1] against cache lanes ``lanes`` [n] of k_cache/v_cache
    [lanes, kv_heads, L, D] -> [n, heads, 1, D]. A query sees the slots of [0, kv_len) at or before its
    position, and after ``position - window`` where ``window`` is not 0; a query at the cache's last
    (scratch) slot sees none and gets zeros. Which lanes, and how far each
    query reads, are device data: a captured step serves every micro-batch and every context length
    up to ``kv_len`` (the cache's whole length, in a captured step). A float8 cache comes with its
    scales ``k_scale``/``v_scale`` [lanes, kv_heads, L] (kv_cache.py): slot i holds ``k_cache[..., i, :]
    * k_scale[..., i]``."""
    n, heads, _, d = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    scaled = k_scale is not None and v_scale is not None
    block_l, warps = TILES[scaled]
    splits, blocks_per_split = split_keys(n, kv_heads, kv_len, block_l)
    q3 = q.reshape(n, heads, d)
    if q3.stride(2) != 1:
        q3 = q3.contiguous()
    out = torch.empty((n, heads, 1, d), device=q.device, dtype=q.dtype)
    if splits == 1:
        acc = stats = out  # unused
    else:
        acc = torch.empty((n, heads, splits, d), device=q.device, dtype=torch.float32)
        stats = torch.empty((n, heads, splits, 2), device=q.device, dtype=torch.float32)
    if scaled:
        assert k_scale.stride() == v_scale.stride() and k_scale.stride(2) == 1  # type: ignore[union-attr]
    _split_kernel[(n * kv_heads, splits)](
        q3,
        k_cache,
        v_cache,
        k_scale if scaled else k_cache,  # (unread unless SCALED)
        v_scale if scaled else v_cache,
        positions,
        lanes,
        acc,
        stats,
        out,
        kv_len,
        k_cache.shape[2] - 1,
        scale,
        q3.stride(0),
        q3.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        k_scale.stride(0) if scaled else 0,  # type: ignore[union-attr]
        k_scale.stride(1) if scaled else 0,  # type: ignore[union-attr]
        positions.stride(0),
        lanes.stride(0),
        KV_HEADS=kv_heads,
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        D=d,
        BLOCK_L=block_l,
        SPLITS=splits,
        BLOCKS_PER_SPLIT=blocks_per_split,
        WINDOW=window,
        SCALED=scaled,
        STATIC_LOOP=os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=warps,
        num_stages=stages(blocks_per_split, scaled),
    )
    if splits > 1:
        _combine_kernel[(n * heads,)](
            acc, stats, out, D=d, SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits)
        )
    return out


@decode_attention.register_fake
def _(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    lanes: torch.Tensor,
    kv_len: int,
    window: int,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    return torch.empty_like(q)


def attend(
    q: torch.Tensor,
    cache: tuple[torch.Tensor, ...],
    positions: torch.Tensor,
    lanes: torch.Tensor,
    kv_len: int,
    window: int,
    scale: float,
) -> torch.Tensor | None:
    """``decode_attention`` on a layer's cache (kv_cache.LayerCache) where the kernel serves ``q``
    (``available``), else None: the model's decode kernel (``StageModel.decode_kernel``), which falls
    back to its own attention on None."""
    if not available(q):
        return None
    return decode_attention(q, *cache[:2], positions, lanes, kv_len, window, scale, *cache[2:])
