"""RMSNorm, a gated MLP's ``silu(gate) * up`` and rotary embedding as one Triton kernel each, for the
passes that run eagerly: a batch job's prompt passes (compiling them costs more start-up than it saves,
job.compiling_prompts_pays) and decode without graphs.

Eagerly, torch runs these as chains of kernels that each read and write the whole activation: RMSNorm
in float32 is seven (widen, square, mean, add, rsqrt, multiply, narrow, then the weight), rotary five a
tensor (two products, a negation, a concatenation, a sum), the gate three. On an H200 those chains were
85 ms of an eager prompt pass's 233 ms for 8,000 tokens of Llama-2-7B, about 1.7 s of a batch-256 job
(docs/performance.md). Each kernel here reads its inputs once and writes its output once.

Each rounds where torch's eager ops round, so a token's logits move by float32 noise, not by a bf16
ulp: RMSNorm narrows before the weight multiplies (HF Llama's order); rotary rounds each product and
the sum (``x * cos + rotate_half(x) * sin`` in the compute dtype); the gate rounds after the silu and
after the product. Only the sums' order differs (a tree in a program, not torch's).

Compiled passes (inductor) fuse these themselves, so the model calls them only outside torch.compile,
and never while a CUDA graph is being captured (a captured decode step runs torch's ops, which
inductor or the graph already made cheap). The kernels specialise on the model's widths only (as
``constexpr``); the number of rows is the grid, so a pass of any size runs the kernels compiled at
warm-up (cuda_graphs.CompiledStage.warm_up runs one eager prompt pass for that).
"""

from __future__ import annotations

from typing import Any

import torch

from conveyor.inference.model import kv_cache

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def serves(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: CUDA, 16-bit, 16-byte aligned, and no graph capturing.
    (An unaligned tensor would compile another variant of a kernel mid-job: it takes torch's ops.)"""
    return (
        triton is not None
        and all(t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) for t in tensors)
        and all(t.data_ptr() % 16 == 0 for t in tensors)
        and not torch.cuda.is_current_stream_capturing()
    )


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, eps, N: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        x = tl.load(x_ptr + row * N + cols, mask=ok, other=0.0).to(tl.float32)
        normed = x * (1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / N + eps))
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        y = w.to(tl.float32) * normed.to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _silu_mul_kernel(h_ptr, y_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < N
        gate = tl.load(h_ptr + row * (2 * N) + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * (2 * N) + N + cols, mask=ok, other=0.0).to(tl.float32)
        dtype = y_ptr.dtype.element_ty
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        tl.store(y_ptr + row * N + cols, (silu * up).to(dtype), mask=ok)

    @triton.jit
    def _rotary_kernel(
        x_ptr,  # [tokens, ROW]: a pass's q | k | v, rotated in place (q's and k's heads)
        cos_ptr,  # [tokens, ROT]
        sin_ptr,
        ROW: tl.constexpr,
        HEADS: tl.constexpr,  # rotated: q's and k's
        HEAD: tl.constexpr,  # head_dim
        ROT: tl.constexpr,  # rotary dim: a prefix of each head
        BLOCK_H: tl.constexpr,  # >= HEADS
        BLOCK: tl.constexpr,  # >= ROT // 2
    ):
        # A program per token, all its heads: the token's cos and sin are loaded once, and each program
        # moves enough bytes to keep loads in flight (a program per head moved 512 bytes: 9.9 ms of a
        # Llama-2-7B prefill of 8,000 tokens, about 5x the bytes' time at the H200's bandwidth).
        token = tl.program_id(0).to(tl.int64)
        heads = tl.arange(0, BLOCK_H)[:, None]
        half = tl.arange(0, BLOCK)[None, :]
        ok = (heads < HEADS) & (half < ROT // 2)
        x = x_ptr + token * ROW + heads * HEAD + half
        dtype = x_ptr.dtype.element_ty
        x1 = tl.load(x, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x + ROT // 2, mask=ok, other=0.0).to(tl.float32)
        table = token * ROT + half
        c1 = tl.load(cos_ptr + table, mask=half < ROT // 2, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + table + ROT // 2, mask=half < ROT // 2, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + table, mask=half < ROT // 2, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + table + ROT // 2, mask=half < ROT // 2, other=0.0).to(tl.float32)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), each term rounded as torch does
        first = (x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)
        second = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
        tl.store(x, first.to(dtype), mask=ok)
        tl.store(x + ROT // 2, second.to(dtype), mask=ok)

    @triton.jit
    def _write_kv_kernel(
        x_ptr,  # [tokens, ROW]: a pass's q | k | v (k rotated)
        k_ptr,  # [lanes, KV, length, HEAD]: a layer's cache
        v_ptr,
        ks_ptr,  # [lanes, KV, length] float32: a float8 cache's key and value scales (SCALED)
        vs_ptr,
        lanes_ptr,  # [tokens] each token's cache lane
        positions_ptr,  # [tokens] and slot
        length,  # cache slots a lane holds
        ROW: tl.constexpr,
        Q: tl.constexpr,  # q's heads, before k's in a row
        KV: tl.constexpr,
        HEAD: tl.constexpr,
        BLOCK_H: tl.constexpr,  # >= KV
        BLOCK: tl.constexpr,  # >= HEAD
        SCALED: tl.constexpr,  # quantized to the cache's float8 as kv_cache.quantize does
        FP8_RECIPROCAL: tl.constexpr,
        TINY: tl.constexpr,
    ):
        # A token's keys and values into its lane's slot, from the rows the qkv product wrote: one
        # kernel for both, where torch's indexed writes of the transposed views took 14.6 ms of an
        # 8,000-token 7B prefill on the H200, for 8.4 GB moved (2.1 ms at its bandwidth).
        token = tl.program_id(0).to(tl.int64)
        heads = tl.arange(0, BLOCK_H)[:, None]
        dims = tl.arange(0, BLOCK)[None, :]
        ok = (heads < KV) & (dims < HEAD)
        lane = tl.load(lanes_ptr + token)
        position = tl.load(positions_ptr + token)
        row = x_ptr + token * ROW + heads * HEAD + dims
        vectors = (lane * KV + heads) * length + position  # [BLOCK_H, 1]
        slot = vectors * HEAD + dims
        k = tl.load(row + Q * HEAD, mask=ok, other=0.0)
        v = tl.load(row + (Q + KV) * HEAD, mask=ok, other=0.0)
        if SCALED:  # kv_cache.quantize: a scale per vector, its largest magnitude over float8's largest
            k, v = k.to(tl.float32), v.to(tl.float32)
            k_scale = tl.maximum(tl.max(tl.abs(k), axis=1) * FP8_RECIPROCAL, TINY)[:, None]
            v_scale = tl.maximum(tl.max(tl.abs(v), axis=1) * FP8_RECIPROCAL, TINY)[:, None]
            k = tl.math.div_rn(k, k_scale)
            v = tl.math.div_rn(v, v_scale)
            tl.store(ks_ptr + vectors, k_scale, mask=heads < KV)
            tl.store(vs_ptr + vectors, v_scale, mask=heads < KV)
        tl.store(k_ptr + slot, k.to(k_ptr.dtype.element_ty), mask=ok)
        tl.store(v_ptr + slot, v.to(v_ptr.dtype.element_ty), mask=ok)


def compiled_variants() -> int:
    """Variants of these kernels Triton has compiled in this process: warm-up makes one of each per
    model width and dtype, and a pass of any size needs no other."""
    if triton is None:
        return 0
    kernels = (_rms_norm_kernel, _silu_mul_kernel, _rotary_kernel, _write_kv_kernel)
    return sum(len(c[0]) for k in kernels for c in getattr(k, "device_caches", {}).values())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, in float32 within, over the last dim."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)  # (a copy where x is not contiguous: the kernel assumes rows of n)
    y = torch.empty_like(rows)
    if rows.shape[0]:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(rows.shape[0],)](rows, weight, y, eps, N=n, BLOCK=block, num_warps=_warps(block))
    return y.view(x.shape)


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` of ``h = gate | up`` along its last dim."""
    n = h.shape[-1] // 2
    rows = h.reshape(-1, 2 * n)
    y = torch.empty(rows.shape[0], n, dtype=h.dtype, device=h.device)
    if rows.shape[0]:
        block = min(1024, triton.next_power_of_2(n))
        grid = (rows.shape[0], triton.cdiv(n, block))
        _silu_mul_kernel[grid](rows, y, N=n, BLOCK=block, num_warps=_warps(block))
    return y.view(*h.shape[:-1], n)


def rotary_(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotated_heads: int, head_dim: int
) -> None:
    """Rotates, in place, the first ``rotated_heads`` heads (q's, then k's) of each token's row of
    ``qkv`` ([..., S, row], contiguous); ``cos``/``sin`` hold [..., S, rotary_dim] (a rotary dim below
    ``head_dim`` rotates a prefix of each head, as GPT-NeoX does)."""
    row, rot = qkv.shape[-1], cos.shape[-1]
    tokens = qkv.numel() // row
    if tokens:
        block_h, block = triton.next_power_of_2(rotated_heads), triton.next_power_of_2(rot // 2)
        _rotary_kernel[(tokens,)](
            qkv,
            cos,
            sin,
            ROW=row,
            HEADS=rotated_heads,
            HEAD=head_dim,
            ROT=rot,
            BLOCK_H=block_h,
            BLOCK=block,
            num_warps=_warps(block_h * block // 2),
        )


def write_kv_(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lanes: torch.Tensor,
    positions: torch.Tensor,
    q_heads: int,
    kv_heads: int,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Writes each token's keys and values from ``qkv`` ([n, S, row], contiguous: q's heads, then k's,
    then v's) into ``k_cache`` / ``v_cache`` ([lanes, kv_heads, length, head_dim]) at its lane (``lanes``
    [n] or [n, 1], or one per token) and slot (``positions`` [n, S]). A float8 cache comes with its
    scales ([lanes, kv_heads, length] float32): the vectors are quantized as ``kv_cache.quantize`` does."""
    n, s = positions.shape
    if not n * s:
        return
    head_dim = k_cache.shape[-1]
    # per sequence ([n] or [n, 1]) or, packed, per token; fresh, so aligned as warm-up's were (a view
    # at an odd offset would compile another variant)
    per_token = lanes.reshape(n, s) if lanes.numel() == n * s else lanes.reshape(n, 1).expand(n, s)
    token_lanes = per_token.clone().reshape(-1)
    scaled = k_scale is not None and v_scale is not None
    _write_kv_kernel[(n * s,)](
        qkv,
        k_cache,
        v_cache,
        k_scale if scaled else k_cache,  # (unread unless SCALED)
        v_scale if scaled else v_cache,
        token_lanes,
        positions.clone().reshape(-1),
        k_cache.shape[2],
        ROW=qkv.shape[-1],
        Q=q_heads,
        KV=kv_heads,
        HEAD=head_dim,
        BLOCK_H=triton.next_power_of_2(kv_heads),
        BLOCK=triton.next_power_of_2(head_dim),
        SCALED=scaled,
        FP8_RECIPROCAL=kv_cache.FP8_RECIPROCAL,
        TINY=torch.finfo(torch.float32).tiny,
        num_warps=_warps(triton.next_power_of_2(kv_heads) * triton.next_power_of_2(head_dim) // 2),
    )


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    return rms_norm(x, weight, eps) if weight.dtype == x.dtype and serves(x, weight) else None


def fused_silu_mul(h: torch.Tensor) -> torch.Tensor | None:
    return silu_mul(h) if serves(h) else None


def fused_rotary_(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotated_heads: int, head_dim: int
) -> bool:
    """``rotary_`` where it serves (in place needs qkv itself contiguous, not a copy); whether it ran."""
    if not (qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous() and serves(qkv, cos, sin)):
        return False
    rotary_(qkv, cos, sin, rotated_heads, head_dim)
    return True


def fused_write_kv_(
    qkv: torch.Tensor,
    cache: tuple[torch.Tensor, ...],
    lanes: torch.Tensor,
    positions: torch.Tensor,
    q_heads: int,
    kv_heads: int,
) -> bool:
    """``write_kv_`` where it serves (a cache of the activations' dtype, or a float8 one with its
    scales); whether it ran."""
    value = kv_cache.FP8 if len(cache) == 4 else qkv.dtype
    if not (qkv.is_contiguous() and cache[0].dtype == cache[1].dtype == value and serves(qkv)):
        return False
    if not all(c.is_contiguous() and c.data_ptr() % 16 == 0 for c in cache):  # (as serves asks of qkv)
        return False
    write_kv_(qkv, cache[0], cache[1], lanes, positions, q_heads, kv_heads, *cache[2:])
    return True


def install(model: Any) -> int:
    """Points a stage model's norms, gated MLPs and attention layers at these kernels (each takes them
    only where ``serves``, else runs torch's ops); returns how many modules. Call before anything is
    compiled: dynamo guards on what it reads."""
    from conveyor.inference.model.stage_model import MLP, Attention, Norm

    count = 0
    for module in model.modules():
        if isinstance(module, Norm) and module.rms:
            module.fused = fused_rms_norm
        elif isinstance(module, MLP) and module.gated_activation == "silu":
            module.fused_gate = fused_silu_mul
        elif isinstance(module, Attention):
            module.fused_rotary, module.fused_write_kv = fused_rotary_, fused_write_kv_
        else:
            continue
        count += 1
    return count
