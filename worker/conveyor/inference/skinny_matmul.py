"""The decode step's matrix products: a few rows of activations times a large weight, read once.

At decode a linear layer is ``x [M, K] @ W[N, K]^T`` with M (the micro-batch) between 1 and 64 and W
tens of MB: its time is the time to read W. cuBLAS reaches 82-88% of the copy bandwidth on a 7B
model's shapes on an H200; this Triton kernel streams W once in tiles of ``block_n`` rows by
``block_k`` columns, software-pipelined (``stages``) so that enough bytes are in flight to cover HBM
latency, and beats it by 5-14% at M=1 (benchmarks/skinny_matmul.py). Neither wins every shape, so the
choice is measured, not assumed: ``tune`` times cuBLAS and a few tile shapes per (N, K, M) on the
model's own weights (rotating over its layers, so no timing reads from L2) when a decode step is first
captured, and ``decode_linear`` (a custom op, opaque to torch.compile and captured in the step's CUDA
graph) runs the winner. ``CONVEYOR_TRITON_KERNELS=0`` keeps cuBLAS everywhere.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

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


# The tile shapes worth timing, by rows: the best of the sweep on an H200 (Llama-2-7B's five shapes)
# and their neighbours. A single row is a multiply-sum on CUDA cores (small block_n: more programs for
# the SMs); more rows are a tensor-core dot, whose smallest tile is 16.
CANDIDATES: dict[int, tuple[Tiles, ...]] = {
    1: (Tiles(8, 256), Tiles(8, 512), Tiles(16, 256), Tiles(32, 256), Tiles(16, 512, stages=3)),
    16: (Tiles(32, 128), Tiles(32, 256), Tiles(16, 256), Tiles(32, 128, stages=3)),
    64: (Tiles(32, 128, stages=3), Tiles(32, 256), Tiles(32, 128)),
}


def block_m(m: int) -> int:
    return 1 if m == 1 else max(16, 1 << (m - 1).bit_length())


def candidates(m: int, weight_dtype: torch.dtype) -> tuple[Tiles, ...]:
    base = CANDIDATES[1 if m == 1 else 16 if m <= 16 else 64]
    if weight_dtype.itemsize == 1:  # int8: the same bytes per tile at twice the columns, and the same tiles
        return tuple(dataclasses.replace(t, block_k=2 * t.block_k) for t in base) + base
    return base


if triton is not None:

    @triton.jit
    def _skinny_kernel(
        x_ptr,
        w_ptr,
        scale_ptr,  # [N] per output channel (int8 weights), unused otherwise
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_om,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        K_TILES: tl.constexpr,
        EVEN: tl.constexpr,
        HAS_SCALE: tl.constexpr,
    ):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        n_ok = offs_n < N
        if BLOCK_M == 1:
            acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in tl.range(0, K_TILES):
            offs_k = i * BLOCK_K + tl.arange(0, BLOCK_K)
            w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
            if EVEN:  # every tile whole: unmasked loads vectorise fully
                w = tl.load(w_ptrs, eviction_policy="evict_first")
            else:
                w = tl.load(
                    w_ptrs,
                    mask=n_ok[:, None] & (offs_k[None, :] < K),
                    other=0.0,
                    eviction_policy="evict_first",
                )
            if BLOCK_M == 1:
                if EVEN:
                    x = tl.load(x_ptr + offs_k)
                else:
                    x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0)
                acc1 += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
            else:
                x = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                    other=0.0,
                )
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        if BLOCK_M == 1:
            acc = acc1[None, :]
        if HAS_SCALE:  # as F.linear(x, w.to(dtype)) * scale rounds: the product first, then the scaled
            scale = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32) * scale[None, :]
        tl.store(
            out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=(offs_m[:, None] < M) & n_ok[None, :],
        )


def skinny_matmul(
    x: torch.Tensor, weight: torch.Tensor, tiles: Tiles, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [M, K] @ weight [N, K]^T`` -> ``[M, N]`` in x's dtype, accumulated in float32. An int8
    ``weight`` comes with ``scale`` [N] (one per output channel), applied after the product."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(
            f"skinny_matmul: x {tuple(x.shape)} and weight {tuple(weight.shape)} must be row-major"
        )
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    _skinny_kernel[(triton.cdiv(n, tiles.block_n),)](
        x,
        weight,
        out if scale is None else scale,
        out,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        BLOCK_M=block_m(m),
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        K_TILES=triton.cdiv(k, tiles.block_k),
        EVEN=k % tiles.block_k == 0 and n % tiles.block_n == 0,
        HAS_SCALE=scale is not None,
        num_warps=tiles.warps,
        num_stages=tiles.stages,
    )
    return out


Key = tuple[int, int, int, torch.dtype, torch.dtype, int]
# (N, K, M, activation dtype, weight dtype, device index) -> the tiles that won, or None where cuBLAS did.
_CHOICES: dict[Key, Tiles | None] = {}


def _key(n: int, k: int, m: int, dtype: torch.dtype, weight: torch.Tensor) -> Key:
    return (n, k, m, dtype, weight.dtype, weight.device.index or 0)


def _torch_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The product as torch computes it: what the kernel matches, and what runs where it does not."""
    if scale is None:
        return F.linear(x, weight)
    return F.linear(x, weight.to(x.dtype)) * scale


@torch.library.custom_op("conveyor::decode_linear", mutates_args=())
def decode_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias; an int8 weight dequantized by ``scale`` per output channel) by
    whichever ``tune`` measured faster for this shape."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    tiles = _CHOICES.get(_key(weight.shape[0], k, rows.shape[0], x.dtype, weight))
    if tiles is None:
        return _torch_linear(x, weight, scale)
    return skinny_matmul(rows.contiguous(), weight, tiles, scale).view(*x.shape[:-1], weight.shape[0])


@decode_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def time_in_graph(fn, calls: int) -> float:  # type: ignore[no-untyped-def]
    """Microseconds per call of ``fn(i)``, ``calls`` of them back to back in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(0)
    torch.cuda.current_stream().wait_stream(side)
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


Product = tuple[torch.Tensor, torch.Tensor | None]  # a layer's weight, and its int8 scale


def _time_product(x: torch.Tensor, group: list[Product], tiles: Tiles | None) -> float:
    def product(i: int) -> torch.Tensor:
        w, scale = group[i % len(group)]
        return _torch_linear(x, w, scale) if tiles is None else skinny_matmul(x, w, tiles, scale)

    with torch.inference_mode():
        return time_in_graph(product, max(len(group), 8))


def tune(products: Iterable[Product], m: int) -> None:
    """Choose cuBLAS or a tile shape for ``x [m, K] @ W^T`` for every weight shape among ``products``,
    timing each over the weights of that shape in turn (a model's layers: enough bytes that L2 holds
    none of them). Shapes chosen before are kept."""
    if triton is None or not kernels_enabled() or m > MAX_ROWS:
        return
    groups: dict[Key, list[Product]] = {}
    for w, scale in products:
        dtype = w.dtype if scale is None else scale.dtype
        if w.is_cuda and w.dim() == 2 and w.stride(1) == 1 and dtype in (torch.bfloat16, torch.float16):
            key = _key(w.shape[0], w.shape[1], m, dtype, w)
            if key not in _CHOICES:
                groups.setdefault(key, []).append((w, scale))
    for key, group in groups.items():
        n, k, _, dtype = key[:4]
        x = torch.randn(m, k, device=group[0][0].device, dtype=dtype)
        cublas_us = _time_product(x, group, None)
        best: tuple[float, Tiles | None] = (cublas_us, None)
        for tiles in candidates(m, group[0][0].dtype):
            try:
                us = _time_product(x, group, tiles)
            except Exception as e:  # a tile shape this GPU cannot run (shared memory) is skipped
                log.debug("skinny_matmul %s on %sx%s: %s", tiles, n, k, e)
                continue
            if us < best[0]:
                best = (us, tiles)
        _CHOICES[key] = best[1]
        log.info(
            "decode matmul [%d x %d] @ [%d x %d]^T (%s weights): %s (%.1f us; cuBLAS %.1f us)",
            m,
            k,
            n,
            k,
            str(group[0][0].dtype).removeprefix("torch."),
            best[1] or "cuBLAS",
            best[0],
            cublas_us,
        )


def kernels_enabled() -> bool:
    """``CONVEYOR_TRITON_KERNELS=0`` keeps the decode step on cuBLAS and inductor's attention."""
    return os.environ.get("CONVEYOR_TRITON_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def is_decode_product(x: torch.Tensor) -> bool:
    """Whether ``x @ W^T`` goes through ``decode_linear``: a few rows on a GPU (prefill stays on cuBLAS)."""
    return triton is not None and x.is_cuda and x.numel() // x.shape[-1] <= MAX_ROWS and kernels_enabled()


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T`` (an int8 weight dequantized by ``scale``): a decode product through
    ``decode_linear``, anything else through torch."""
    return decode_linear(x, weight, scale) if is_decode_product(x) else _torch_linear(x, weight, scale)


def _linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not is_decode_product(x):
        return F.linear(x, module.weight, module.bias)
    y = decode_linear(x, module.weight)
    return y if module.bias is None else y + module.bias


def route_linears(model: nn.Module) -> list[Product]:
    """Send the plain ``nn.Linear`` layers of ``model`` through ``decode_linear`` (forward hooks, such as
    tensor parallelism's all-reduce, still run around them) and return every product ``tune`` should
    time: theirs, and those of the int8 layers (quantize.py), which call ``decode_linear`` themselves."""
    products: list[Product] = []
    if triton is None or not kernels_enabled():
        return products
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.is_cuda:
            module.forward = _linear_forward.__get__(module)  # type: ignore[method-assign]
            products.append((module.weight, None))
        elif isinstance(scale := getattr(module, "scale", None), torch.Tensor):
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dtype == torch.int8:
                products.append((weight, scale))
    return products
