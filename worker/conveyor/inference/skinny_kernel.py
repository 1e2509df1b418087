"""The Triton kernel of skinny_matmul.py: ``x [M, K] @ W [N, K]^T`` for a few rows, W streamed once.

One program per (column tile, K split). Its options, each a compile-time flag: int8 weights with a
scale per output channel, a gated MLP's gate | up (``silu(gate) * up`` from one program), a split along
K (the last split of a tile to finish adds the float32 sums), and fused_norm.py's two: ``NORM`` (the
input rows are normalised by RMSNorm as they are loaded, 1 / rms taken from partial sums of squares)
and ``RESIDUAL`` (a residual added to the result, and each tile's share of its rows' sums of squares
written). skinny_matmul.py chooses the tiles and launches it.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the kernel is for CUDA devices
    triton = None

if triton is not None:

    @triton.jit
    def _silu_times(gate, up):
        # Rounded where torch rounds F.silu(gate) * up in gate's dtype: after the silu, after the product.
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
        return (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)

    @triton.jit
    def _w_tile(w_ptr, offs_n, offs_k, n_ok, N, K, stride_wn, EVEN: tl.constexpr):
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
        if EVEN:  # every tile whole: unmasked loads vectorise fully
            return tl.load(w_ptrs, eviction_policy="evict_first")
        return tl.load(
            w_ptrs, mask=n_ok[:, None] & (offs_k[None, :] < K), other=0.0, eviction_policy="evict_first"
        )

    @triton.jit
    def _rounded(acc, scale_ptr, offs_n, n_ok, dtype: tl.constexpr, HAS_SCALE: tl.constexpr):
        # As F.linear(x, w.to(dtype)) * scale rounds: the product first, then the scaled
        y = acc.to(dtype)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            y = (y.to(tl.float32) * scale[None, :]).to(dtype)
        return y

    @triton.jit
    def _skinny_kernel(
        x_ptr,
        w_ptr,
        scale_ptr,  # [N] per output channel (int8 weights; [2N] with GATE_UP), unused otherwise
        out_ptr,
        partial_ptr,  # [SPLITS, M, N] float32: each K split's sums (SPLITS > 1)
        arrivals_ptr,  # [column tiles] int32, zero between calls: how many splits of a tile are done
        norm_ptr,  # NORM: [K] the RMSNorm weight x is scaled by
        sumsq_ptr,  # NORM: [PARTS, M] float32 partial row sums of x**2, read; RESIDUAL: [column tiles, M], written
        residual_ptr,  # RESIDUAL: [M, N] (strides of out) added to the product
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_om,
        eps,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        K_TILES: tl.constexpr,  # per split
        EVEN: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        GATE_UP: tl.constexpr,  # weight rows are gate | up (2N): out = silu(x @ gate^T) * (x @ up^T)
        SPLITS: tl.constexpr,
        NORM: tl.constexpr,  # x is the residual stream: the product is of RMSNorm(x) (weight norm_ptr)
        PARTS: tl.constexpr,  # NORM: how many partial sums of squares a row has (a power of two or not)
        PARTS_P2: tl.constexpr,
        RESIDUAL: tl.constexpr,  # out = residual + product, and each column tile's row sums of out**2
    ):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        n_ok = offs_n < N
        inv_rms = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if NORM:  # 1 / rms of each row, from the sums of squares its producer wrote (no pass over x)
            offs_p = tl.arange(0, PARTS_P2)
            sums = tl.load(
                sumsq_ptr + offs_p[:, None] * M + offs_m[None, :],
                mask=(offs_p[:, None] < PARTS) & (offs_m[None, :] < M),
                other=0.0,
            )
            inv_rms = tl.math.rsqrt(tl.sum(sums, axis=0) / K + eps)
        if BLOCK_M == 1:
            acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
            acc1_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        first_tile = tl.program_id(1) * K_TILES
        for i in tl.range(0, K_TILES):
            offs_k = (first_tile + i) * BLOCK_K + tl.arange(0, BLOCK_K)
            w = _w_tile(w_ptr, offs_n, offs_k, n_ok, N, K, stride_wn, EVEN)
            if GATE_UP:
                w_up = _w_tile(w_ptr + N * stride_wn, offs_n, offs_k, n_ok, N, K, stride_wn, EVEN)
            if BLOCK_M == 1:  # a multiply-sum on CUDA cores
                if EVEN:
                    x = tl.load(x_ptr + offs_k)
                else:
                    x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0)
                if NORM:
                    x = _normed(x, inv_rms, norm_ptr, offs_k, K, EVEN)
                x = x.to(tl.float32)
                acc1 += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
                if GATE_UP:
                    acc1_up += tl.sum(w_up.to(tl.float32) * x[None, :], axis=1)
            else:
                x = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                    other=0.0,
                )
                if NORM:
                    x = _normed(x, inv_rms[:, None], norm_ptr, offs_k[None, :], K, EVEN)
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
                if GATE_UP:
                    acc_up = tl.dot(x, tl.trans(w_up.to(x.dtype)), acc_up)
        if BLOCK_M == 1:
            acc = acc1[None, :]
            acc_up = acc1_up[None, :]
        out_ok = (offs_m[:, None] < M) & n_ok[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        if SPLITS == 1:
            _finish(
                acc,
                acc_up,
                out_ptrs,
                out_ok,
                scale_ptr,
                offs_n,
                n_ok,
                N,
                HAS_SCALE,
                GATE_UP,
                residual_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                sumsq_ptr + tl.program_id(0) * M + offs_m,
                offs_m < M,
                RESIDUAL,
            )
        else:  # (not with GATE_UP) the split's sums out; the last split of the tile to finish adds them up
            sums = offs_m[:, None] * N + offs_n[None, :]
            tl.store(partial_ptr + tl.program_id(1) * M * N + sums, acc, mask=out_ok)
            tl.debug_barrier()  # every thread's sums are written before the arrival is counted (release)
            if tl.atomic_add(arrivals_ptr + tl.program_id(0), 1) == SPLITS - 1:
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for split in tl.static_range(SPLITS):  # in split order: the same sum whoever arrives last
                    total += tl.load(
                        partial_ptr + split * M * N + sums, mask=out_ok, other=0.0, cache_modifier=".cg"
                    )
                tl.atomic_xchg(arrivals_ptr + tl.program_id(0), 0)  # zero again for the next call
                _finish(
                    total,
                    acc_up,
                    out_ptrs,
                    out_ok,
                    scale_ptr,
                    offs_n,
                    n_ok,
                    N,
                    HAS_SCALE,
                    GATE_UP,
                    residual_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                    sumsq_ptr + tl.program_id(0) * M + offs_m,
                    offs_m < M,
                    RESIDUAL,
                )

    @triton.jit
    def _finish(
        acc,
        acc_up,
        out_ptrs,
        out_ok,
        scale_ptr,
        offs_n,
        n_ok,
        N,
        HAS_SCALE: tl.constexpr,
        GATE_UP: tl.constexpr,
        residual_ptrs,
        sumsq_ptrs,
        m_ok,
        RESIDUAL: tl.constexpr,
    ):
        dtype = out_ptrs.dtype.element_ty
        y = _rounded(acc, scale_ptr, offs_n, n_ok, dtype, HAS_SCALE)
        if GATE_UP:
            y = _silu_times(y, _rounded(acc_up, scale_ptr + N, offs_n, n_ok, dtype, HAS_SCALE))
        if RESIDUAL:  # x + layer(x), rounded as torch adds two tensors of x's dtype
            residual = tl.load(residual_ptrs, mask=out_ok, other=0.0)
            y = (y.to(tl.float32) + residual.to(tl.float32)).to(dtype)
            y32 = tl.where(out_ok, y.to(tl.float32), 0.0)
            # this tile's share of each row's sum of squares: the next norm's, summed by its consumer
            tl.store(sumsq_ptrs, tl.sum(y32 * y32, axis=1), mask=m_ok)
        tl.store(out_ptrs, y, mask=out_ok)

    @triton.jit
    def _normed(x, inv_rms, norm_ptr, offs_k, K, EVEN: tl.constexpr):
        # RMSNorm of a tile of x, rounded where model.Norm rounds: x * inv_rms in float32 cast to x's
        # dtype, then times the weight in that dtype
        if EVEN:
            g = tl.load(norm_ptr + offs_k)
        else:
            g = tl.load(norm_ptr + offs_k, mask=offs_k < K, other=0.0)
        x = (x.to(tl.float32) * inv_rms).to(x.dtype)
        return (x.to(tl.float32) * g.to(tl.float32)).to(x.dtype)
