"""The decode step's matrix products: a few rows of activations times a large weight, read once.

At decode a linear layer is ``x [M, K] @ W[N, K]^T`` with M (the micro-batch) between 1 and 64 and W
tens of MB: its time is the time to read W. cuBLAS reaches 82-88% of the copy bandwidth on a 7B
model's shapes on an H200; this Triton kernel streams W once in tiles of ``block_n`` rows by
``block_k`` columns, software-pipelined (``stages``) so that enough bytes are in flight to cover HBM
latency, and beats it by 5-14% at M=1 (benchmarks/skinny_matmul.py). A weight of few rows (4096: the
attention output, the down projection) is also split along K, so that every SM streams to the end; the
last split of a column tile to finish adds up the others' float32 sums (13% faster than cuBLAS's own
split-K and its reduce kernel on the down projection at M=1). Neither wins every shape, so the
choice is measured, not assumed: ``tune`` times cuBLAS and a few tile shapes per (N, K, M) on the
model's own weights (rotating over its layers, so no timing reads from L2) when a decode step is first
captured, and ``decode_linear`` (a custom op, opaque to torch.compile and captured in the step's CUDA
graph) runs the winner. A silu-gated MLP's gate | up product can also return ``F.silu(gate) * up``
from the same kernel (``decode_gate_up``: one program holds the gate and up rows of the same columns),
which saves the step a kernel per layer; ``tune`` keeps it where it beats the product followed by a
separate silu-multiply (at batch 1 and 16 on an H200, not at 64). ``CONVEYOR_TRITON_KERNELS=0`` keeps
cuBLAS everywhere.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from conveyor.inference.kernels import compile_cache, elementwise
from conveyor.inference.kernels.side_stream import warm_up

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the kernel is for CUDA devices
    triton = None

log = logging.getLogger(__name__)

MAX_ROWS = 64  # beyond a micro-batch of 64 a product is compute-shaped: cuBLAS's


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_n: int
    block_k: int
    warps: int = 4
    stages: int = 4
    splits: int = 1  # programs along K per column tile; the last to finish adds up the others' sums


# The tile shapes worth timing, by rows: the best of the sweep on an H200 (Llama-2-7B's five shapes)
# and their neighbours. A single row is a multiply-sum on CUDA cores (small block_n: more programs for
# the SMs); more rows are a tensor-core dot, whose smallest tile is 16.
CANDIDATES: dict[int, tuple[Tiles, ...]] = {
    1: (Tiles(8, 256), Tiles(8, 512), Tiles(16, 256), Tiles(32, 256), Tiles(16, 512, stages=3)),
    16: (Tiles(32, 128), Tiles(32, 256), Tiles(16, 256), Tiles(32, 128, stages=3), Tiles(64, 128, stages=3)),
    64: (
        Tiles(32, 128, stages=3),
        Tiles(32, 256),
        Tiles(32, 128),
        Tiles(64, 64),
        # Wider column tiles read the 64 rows of x (from L2) fewer times per weight byte: they won the
        # fused qkv (28.2 us, cuBLAS 31.0) and the LM head (67.1 us, cuBLAS 69.1) on an H200.
        Tiles(128, 64),
        Tiles(128, 64, stages=3),
        Tiles(64, 128, stages=3),
    ),
}


def block_m(m: int) -> int:
    return 1 if m == 1 else max(16, 1 << (m - 1).bit_length())


# A weight of few rows (4096: attention output, down projection) gives few column tiles; split along K,
# it keeps every SM streaming to the end (cuBLAS does the same, with a reduce kernel after).
SPLITS = (2, 4)
SPLIT_BELOW_TILES = 520


def candidates(
    m: int, weight_dtype: torch.dtype, n: int = 0, k: int = 0, gate_up: bool = False
) -> tuple[Tiles, ...]:
    """The tiles worth timing for ``x [m, k] @ W [n, k]^T``: the sweep's, and their K splits where the
    column tiles are few."""
    base = CANDIDATES[1 if m == 1 else 16 if m <= 16 else 64]
    if weight_dtype.itemsize == 1:  # int8: the same bytes per tile at twice the columns, and the same tiles
        base = tuple(dataclasses.replace(t, block_k=2 * t.block_k) for t in base) + base
    if gate_up:
        return base
    split = tuple(
        dataclasses.replace(t, splits=s)
        for t in base
        for s in SPLITS
        if -(-n // t.block_n) < SPLIT_BELOW_TILES and k >= 2 * s * t.block_k
    )
    return base + split


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
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_om,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        K_TILES: tl.constexpr,  # per split
        EVEN: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        GATE_UP: tl.constexpr,  # weight rows are gate | up (2N): out = silu(x @ gate^T) * (x @ up^T)
        SPLITS: tl.constexpr,
    ):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        n_ok = offs_n < N
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
                    x = tl.load(x_ptr + offs_k).to(tl.float32)
                else:
                    x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                acc1 += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
                if GATE_UP:
                    acc1_up += tl.sum(w_up.to(tl.float32) * x[None, :], axis=1)
            else:
                x = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                    other=0.0,
                )
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
                if GATE_UP:
                    acc_up = tl.dot(x, tl.trans(w_up.to(x.dtype)), acc_up)
        if BLOCK_M == 1:
            acc = acc1[None, :]
            acc_up = acc1_up[None, :]
        out_ok = (offs_m[:, None] < M) & n_ok[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        if SPLITS == 1:
            _finish(acc, acc_up, out_ptrs, out_ok, scale_ptr, offs_n, n_ok, N, HAS_SCALE, GATE_UP)
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
                _finish(total, acc_up, out_ptrs, out_ok, scale_ptr, offs_n, n_ok, N, HAS_SCALE, GATE_UP)

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
    ):
        dtype = out_ptrs.dtype.element_ty
        y = _rounded(acc, scale_ptr, offs_n, n_ok, dtype, HAS_SCALE)
        if GATE_UP:
            y = _silu_times(y, _rounded(acc_up, scale_ptr + N, offs_n, n_ok, dtype, HAS_SCALE))
        tl.store(out_ptrs, y, mask=out_ok)


_ARRIVALS: dict[torch.device, torch.Tensor] = {}


def _arrivals(device: torch.device, tiles: int) -> torch.Tensor:
    """The split-K arrival counters of a device: zeros, left zero by every call (the last split of a
    tile resets its counter), so a captured step needs no memset. Shared by the calls on a device, which
    run one after another on its stream."""
    counters = _ARRIVALS.get(device)
    if counters is None or counters.numel() < tiles:
        counters = _ARRIVALS[device] = torch.zeros(
            max(tiles, SPLIT_BELOW_TILES), dtype=torch.int32, device=device
        )
    return counters


def skinny_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    tiles: Tiles,
    scale: torch.Tensor | None = None,
    gate_up: bool = False,
) -> torch.Tensor:
    """``x [M, K] @ weight [N, K]^T`` -> ``[M, N]`` in x's dtype, accumulated in float32. An int8
    ``weight`` comes with ``scale`` [N] (one per output channel), applied after the product.
    ``gate_up``: weight is a gated MLP's gate | up ([2N, K]) and the result ``F.silu(gate) * up``
    ([M, N]), computed where the products are, so no kernel writes or reads the products."""
    grid, args, options = _launch(x, weight, tiles, scale, gate_up)
    _skinny_kernel[grid](*args, **options)
    return args[3]


def _launch(
    x: torch.Tensor, weight: torch.Tensor, tiles: Tiles, scale: torch.Tensor | None, gate_up: bool
) -> tuple[tuple[int, int], tuple[Any, ...], dict[str, Any]]:
    """The kernel's grid, arguments (the output is the fourth) and compile-time options."""
    m, k = x.shape
    n = weight.shape[0] // 2 if gate_up else weight.shape[0]
    if weight.shape[1] != k or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(
            f"skinny_matmul: x {tuple(x.shape)} and weight {tuple(weight.shape)} must be row-major"
        )
    if gate_up and tiles.splits > 1:
        raise ValueError("skinny_matmul: gate_up products are not split along K")
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    column_tiles = triton.cdiv(n, tiles.block_n)
    k_tiles = triton.cdiv(triton.cdiv(k, tiles.block_k), tiles.splits)
    partials = arrivals = out  # unused unless split
    if tiles.splits > 1:
        partials = torch.empty((tiles.splits, m, n), device=x.device, dtype=torch.float32)
        arrivals = _arrivals(x.device, column_tiles)
    args = (
        x,
        weight,
        out if scale is None else scale,
        out,
        partials,
        arrivals,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
    )
    options = {
        "BLOCK_M": block_m(m),
        "BLOCK_N": tiles.block_n,
        "BLOCK_K": tiles.block_k,
        "K_TILES": k_tiles,
        "EVEN": k == k_tiles * tiles.splits * tiles.block_k and n % tiles.block_n == 0,
        "HAS_SCALE": scale is not None,
        "GATE_UP": gate_up,
        "SPLITS": tiles.splits,
        "num_warps": tiles.warps,
        "num_stages": tiles.stages,
    }
    return (column_tiles, tiles.splits), args, options


def precompile(jobs: Iterable[tuple[torch.Tensor, torch.Tensor, Tiles, torch.Tensor | None, bool]]) -> None:
    """Compile the kernels of ``jobs`` (``skinny_matmul``'s arguments) without running them, in
    parallel (Triton's AsyncCompileMode on a thread pool: its compiler passes release the GIL and ptxas
    is a process of its own), so a cold tune's compiles (about 90 for a 7B model at M=64: a kernel per
    tile shape, K split and weight shape) overlap instead of queueing one by one. A job that does not
    compile is left to the timing, which skips it."""
    jobs = list(jobs)
    mode = getattr(triton, "AsyncCompileMode", None)
    if not jobs or mode is None:  # older Triton: each compiles when first timed
        return
    pool = ThreadPoolExecutor(max_workers=min(len(jobs), compile_cache.cpu_share(), 32))
    with pool, mode(pool, ignore_errors=True):  # (the mode's exit waits for the compiles: pool's after)
        for job in jobs:
            try:
                grid, args, options = _launch(*job)
                _skinny_kernel.warmup(*args, grid=grid, **options)
            except Exception as e:  # e.g. a tile shape needing more shared memory than this GPU has
                log.debug("skinny_matmul precompile %s: %s", job[2], e)


Key = tuple[int, int, int, torch.dtype, torch.dtype, int, bool]
# (N, K, M, activation dtype, weight dtype, device index, gate | up with silu) -> the tiles that won, or
# None where cuBLAS did.
_CHOICES: dict[Key, Tiles | None] = {}


def _key(n: int, k: int, m: int, dtype: torch.dtype, weight: torch.Tensor, gate_up: bool = False) -> Key:
    return (n, k, m, dtype, weight.dtype, weight.device.index or 0, gate_up)


def _torch_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The product as torch computes it: what the kernel matches, and what runs where it does not."""
    if scale is None:
        return F.linear(x, weight)
    return F.linear(x, weight.to(x.dtype)) * scale


def _torch_gate_up(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    gate, up = _torch_linear(x, weight, scale).chunk(2, dim=-1)
    return F.silu(gate) * up


def _chosen_product(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, gate_up: bool
) -> torch.Tensor:
    """The product (``gate_up``: ``F.silu(gate) * up``) by the tiles ``tune`` chose for its shape, or in
    torch's form where it chose none."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    tiles = _CHOICES.get(_key(weight.shape[0], k, rows.shape[0], x.dtype, weight, gate_up))
    if tiles is None:
        return (_torch_gate_up if gate_up else _torch_linear)(x, weight, scale)
    y = skinny_matmul(rows.contiguous(), weight, tiles, scale, gate_up)
    return y.view(*x.shape[:-1], y.shape[-1])


@torch.library.custom_op("conveyor::decode_linear", mutates_args=())
def decode_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias; an int8 weight dequantized by ``scale`` per output channel) by
    whichever ``tune`` measured faster for this shape."""
    return _chosen_product(x, weight, scale, gate_up=False)


@decode_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("conveyor::decode_gate_up", mutates_args=())
def decode_gate_up(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """A silu-gated MLP's ``F.silu(gate) * up`` from its input and its gate | up weight ([2I, K]; an
    int8 weight dequantized by ``scale``) by the Triton tiles ``tune`` chose (torch where it chose none)."""
    return _chosen_product(x, weight, scale, gate_up=True)


@decode_gate_up.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0] // 2)


def time_in_graph(fn, calls: int) -> float:  # type: ignore[no-untyped-def]
    """Microseconds per call of ``fn(i)``, ``calls`` of them back to back in one CUDA graph."""
    warm_up(lambda: fn(0))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


class Product(NamedTuple):
    """A layer's weight, its int8 scale, and whether it is a silu-gated MLP's gate | up (the product
    ``F.silu(gate) * up``)."""

    weight: torch.Tensor
    scale: torch.Tensor | None = None
    gate_up: bool = False


def _time_product(
    x: torch.Tensor, group: list[Product], tiles: Tiles | None, gate_up: bool = False, fused: bool = False
) -> float:
    """Microseconds per product over ``group``: cuBLAS (``tiles`` None) or the Triton kernel. ``gate_up``:
    the product, then one kernel that reads both halves and writes their product (inductor's fused
    silu-multiply, timed as torch.mul); with ``fused``, the kernel computing the gate itself."""

    def product(i: int) -> torch.Tensor:
        w, scale, _ = group[i % len(group)]
        if fused:
            return skinny_matmul(x, w, tiles, scale, gate_up=True)  # type: ignore[arg-type]
        y = _torch_linear(x, w, scale) if tiles is None else skinny_matmul(x, w, tiles, scale)
        if gate_up:
            gate, up = y.chunk(2, dim=-1)
            return torch.mul(gate, up)
        return y

    with torch.inference_mode():
        return time_in_graph(product, max(len(group), 8))


def tune(products: Iterable[Product], m: int) -> int:
    """Choose cuBLAS or a tile shape for ``x [m, K] @ W^T`` for every weight shape among ``products``,
    timing each over the weights of that shape in turn (a model's layers: enough bytes that L2 holds
    none of them), then for each gate | up shape whether the fused kernel beats that choice followed by
    the separate silu-multiply. Shapes chosen before are kept. Returns how many shapes it timed."""
    if triton is None or m > MAX_ROWS:
        return 0
    groups: dict[Key, list[Product]] = {}
    for product in products:
        w, scale, gate_up = product
        dtype = w.dtype if scale is None else scale.dtype
        if w.is_cuda and w.dim() == 2 and w.stride(1) == 1 and dtype in (torch.bfloat16, torch.float16):
            key = _key(w.shape[0], w.shape[1], m, dtype, w, gate_up)
            if key not in _CHOICES:
                groups.setdefault(key, []).append(product)
    inputs = {
        key: torch.randn(m, key[1], device=group[0].weight.device, dtype=key[3])
        for key, group in groups.items()
    }
    precompile(
        (inputs[key], group[0].weight, tiles, group[0].scale, gate_up)
        for key, group in groups.items()
        for gate_up in [key[6]]
        for tiles in candidates(m, key[4], key[0] // 2 if gate_up else key[0], key[1], gate_up)
    )
    for key, group in sorted(groups.items(), key=lambda item: item[0][6]):  # plain products first
        n, k, _, dtype, weight_dtype, _, gate_up = key
        x = inputs[key]
        # the rival: cuBLAS; for gate | up, the plain product as chosen, then the silu-multiply
        rival = _CHOICES[(*key[:6], False)] if gate_up else None
        rival_us = _time_product(x, group, rival, gate_up)
        best: tuple[float, Tiles | None] = (rival_us, None)
        for tiles in candidates(m, weight_dtype, n // 2 if gate_up else n, k, gate_up):
            try:
                us = _time_product(x, group, tiles, gate_up, fused=gate_up)
            except Exception as e:  # a tile shape this GPU cannot run (shared memory) is skipped
                log.debug("skinny_matmul %s on %sx%s: %s", tiles, n, k, e)
                continue
            if us < best[0]:
                best = (us, tiles)
        _CHOICES[key] = best[1]
        log.info(
            "decode %s [%d x %d] @ [%d x %d]^T (%s weights): %s (%.1f us; %s %.1f us)",
            "gate|up + silu" if gate_up else "matmul",
            m,
            k,
            n,
            k,
            str(weight_dtype).removeprefix("torch."),
            best[1] or ("unfused" if gate_up else "cuBLAS"),
            best[0],
            "unfused" if gate_up else "cuBLAS",
            rival_us,
        )
    return len(groups)


def kernels_enabled() -> bool:
    """``CONVEYOR_TRITON_KERNELS=0`` keeps the decode step on cuBLAS and inductor's attention (read once,
    at an entry point: GenerationOptions.from_env)."""
    return os.environ.get("CONVEYOR_TRITON_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def is_decode_product(x: torch.Tensor) -> bool:
    """Whether ``x @ W^T`` goes through ``decode_linear``: a few rows on a GPU (prefill stays on cuBLAS).
    Rows that are a symbol (a prompt pass compiled once for every length) stay on cuBLAS too: tiles are
    chosen per row count, and asking for one would pin the compiled pass to a single length (a symbol is
    never statically known, and asking adds no guard)."""
    few_rows = statically_known_true(x.numel() // x.shape[-1] <= MAX_ROWS)
    return triton is not None and x.is_cuda and few_rows


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T`` (an int8 weight dequantized by ``scale``): a decode product through
    ``decode_linear``, anything else through torch."""
    return decode_linear(x, weight, scale) if is_decode_product(x) else _torch_linear(x, weight, scale)


def _linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not is_decode_product(x):
        return F.linear(x, module.weight, module.bias)
    y = decode_linear(x, module.weight)
    return y if module.bias is None else y + module.bias


def _int8(module: nn.Module) -> torch.Tensor | None:
    """The scale of an int8 layer (quantize.Int8Linear: int8 weight, a scale per output channel)."""
    scale, weight = getattr(module, "scale", None), getattr(module, "weight", None)
    int8 = isinstance(weight, torch.Tensor) and weight.dtype == torch.int8
    return scale if int8 and isinstance(scale, torch.Tensor) else None


@torch.compiler.assume_constant_result
def _fused(n: int, k: int, m: int, dtype: str, weight_dtype: str, device: int) -> bool:
    # Whether tune chose the fused gate | up kernel for this shape: a constant to torch.compile (the
    # choice is made before the step that uses it is traced, and never changes after).
    key = (n, k, m, getattr(torch, dtype), getattr(torch, weight_dtype), device, True)
    return _CHOICES.get(key) is not None  # type: ignore[arg-type]


def _gate_up_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A silu-gated MLP's ``F.silu(gate) * up`` from its gate | up layer ``module``: one fused kernel at
    decode where tune chose it, else the layer's own product (its class's, not its current forward:
    routing a model twice gates once) and torch's gate (which inductor fuses into one kernel)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    n, k = weight.shape
    name = str(x.dtype).removeprefix("torch."), str(weight.dtype).removeprefix("torch.")
    if is_decode_product(x) and _fused(n, k, x.numel() // k, *name, weight.device.index or 0):
        return decode_gate_up(x, weight, _int8(module))
    plain = _linear_forward if type(module) is nn.Linear else type(module).forward
    h = plain(module, x)  # type: ignore[arg-type]
    if not torch.compiler.is_compiling() and (y := elementwise.fused_silu_mul(h)) is not None:
        return y  # an eager pass (a batch job's prefill): the gate in one kernel
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def route_linears(model: nn.Module) -> list[Product]:
    """Send the plain ``nn.Linear`` layers of ``model`` through ``decode_linear``, and have the gate | up
    layer of each silu-gated MLP (model.MLP, without bias) return ``F.silu(gate) * up`` itself, through
    ``decode_gate_up`` where that is faster (forward hooks, such as tensor parallelism's all-reduce, still
    run around them). Returns every product ``tune`` should time: theirs, and those of the int8 layers
    (quantize.py), which call ``decode_linear`` themselves."""
    products: list[Product] = []
    if triton is None:
        return products
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.is_cuda:
            module.forward = _linear_forward.__get__(module)  # type: ignore[method-assign]
            products.append(Product(module.weight))
        elif (scale := _int8(module)) is not None:
            products.append(Product(module.weight, scale))  # type: ignore[arg-type]
    for mlp in model.modules():
        gate_up = getattr(mlp, "w_in", None)
        if getattr(mlp, "gated_activation", None) != "silu" or not isinstance(gate_up, nn.Module):
            continue
        weight = gate_up.weight
        if isinstance(weight, torch.Tensor) and weight.is_cuda and gate_up.bias is None:
            # a method like the plain layers' (no partial holding the module: a compiled layer is reused
            # for every layer only where nothing per-layer sits in what dynamo guards)
            gate_up.forward = _gate_up_forward.__get__(gate_up)  # type: ignore[method-assign]
            setattr(mlp, "up_applies_gate", True)  # noqa: B010 (any module with the attribute)
            products.append(Product(weight, _int8(gate_up), gate_up=True))
    return products
