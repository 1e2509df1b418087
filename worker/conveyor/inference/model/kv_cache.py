"""A static, preallocated KV cache of one pipeline stage, organised in lanes.

A lane is one row of the cache: the keys and values of one sequence, written at that sequence's own
positions. ``length = max_len + 1``: the last slot is a scratch slot where idle lanes of a decode step
write (their output is discarded), so a decode step always runs over all lanes of a micro-batch with
the same shapes. A query never attends to the scratch slot (its position is below it), and garbage
left beyond a sequence's position is masked until the sequence overwrites it.

The cache may be stored in float8 (``spec.model.kvCacheDtype: fp8``, vLLM's ``kv_cache_dtype``): about
half the bytes of bf16, so twice the lanes or context in the same memory. A decode step's attention
reads half the bytes too, yet on an H200 it was slower (18.4 against 12.8 ms at 256 lanes and
position 380: decode_attention.py widens each tile before its dots; docs/performance.md). Each key and value vector (one token, one KV head) is stored
with its own float32 scale, its largest magnitude over float8 e4m3's largest (448): unscaled, a
small model's values fall below e4m3's normal range (SmolLM2-135M: 42% of its first layer's values)
and its greedy text parted from HF's within 4-13 tokens on half of a few prompts. The scales add 4
bytes per head_dim bytes (3% at 128). Attention reads the values back in the compute dtype: it sees
keys and values rounded to float8's 3 mantissa bits, nothing else.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
FP8_RECIPROCAL = 1 / FP8_MAX  # (1/448 is no float32: rounded once, where it is used)
# spec.model.kvCacheDtype -> the storage dtype (None: the model's compute dtype)
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {"auto": None, "fp8": FP8}

# One layer's cache: (keys, values) [lanes, kv_heads, length, head_dim], and for a float8 cache their
# scales [lanes, kv_heads, length] (float32) after them.
LayerCache = tuple[torch.Tensor, ...]


def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` [..., head_dim] as float8 and a float32 scale per vector [...]: ``q * scale`` is ``t``
    rounded to float8 (an all-zero vector keeps zeros)."""
    amax = t.abs().amax(-1).float()
    # times the float32 reciprocal, not over 448: CUDA's division by a scalar multiplies by it (a
    # rounding from the CPU's), and the prompt passes' write kernel (elementwise.py) must match both
    scale = (amax * FP8_RECIPROCAL).clamp_min(torch.finfo(torch.float32).tiny)
    return (t.float() / scale[..., None]).to(FP8), scale


def write(
    cache: LayerCache, lanes: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Write k, v [n, kv_heads, S, head_dim] at ``positions`` [n, S] of ``lanes`` [n, 1], in place."""
    k_layer, v_layer = cache[0], cache[1]
    if len(cache) == 2:  # indexed: [n, S, kv_heads, head_dim]
        k_layer[lanes, :, positions] = k.transpose(1, 2)
        v_layer[lanes, :, positions] = v.transpose(1, 2)
        return
    k_scale, v_scale = cache[2], cache[3]
    compiling = torch.compiler.is_compiling()
    for values, scales, t in ((k_layer, k_scale, k), (v_layer, v_scale, v)):
        q, s = quantize(t)
        if compiling:  # inductor writes float8 itself; a byte view would be copied back whole
            values[lanes, :, positions] = q.transpose(1, 2)
        else:  # eager, as bytes: not every torch build's CUDA kernels take float8
            values.view(torch.uint8)[lanes, :, positions] = q.transpose(1, 2).view(torch.uint8)
        scales[lanes, :, positions] = s.transpose(1, 2)  # [n, S, kv_heads]


def read(
    cache: LayerCache, lanes: torch.Tensor, kv_len: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of ``lanes`` [n] over slots [0, kv_len) in ``dtype``: [n, kv_heads, kv_len, head_dim]."""
    if len(cache) == 2:
        return cache[0][lanes, :, :kv_len], cache[1][lanes, :, :kv_len]
    # gathered as bytes: CUDA's indexing kernel has no float8 case
    k = cache[0].view(torch.uint8)[lanes, :, :kv_len].view(FP8)
    v = cache[1].view(torch.uint8)[lanes, :, :kv_len].view(FP8)
    k_scale = cache[2][lanes, :, :kv_len, None]
    v_scale = cache[3][lanes, :, :kv_len, None]
    return (k.float() * k_scale).to(dtype), (v.float() * v_scale).to(dtype)


GIB = 1 << 30
# Left free beside the cache for what warm-up and the prompt passes allocate (a packed prefill's
# activations, CUDA graphs' pools, cuBLAS's workspace); a cache that fits only without it fails later
HEADROOM_BYTES = 2 * GIB


def cache_bytes(
    layers: int, lanes: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype
) -> int:
    """What ``KVCache(...)`` allocates, without allocating it: keys and values, and a float8 cache's scales."""
    slots = lanes * kv_heads * (max_len + 1)
    scales = 2 * slots * 4 if dtype == FP8 else 0
    return 2 * slots * head_dim * dtype.itemsize * layers + scales * layers


def refuse_if_too_large(
    layers: int,
    lanes: int,
    kv_heads: int,
    max_len: int,
    head_dim: int,
    dtype: torch.dtype,
    free_bytes: int,
) -> None:
    """Refuse (InputError: exit 2, no restart) a cache that cannot fit the ``free_bytes`` left on the
    device after the weights, naming its size, how many lanes would fit and the fixes. Without this
    check a rank fails with CUDA's out-of-memory error allocating a layer, and is restarted to fail
    the same way after every warm-up."""
    need = cache_bytes(layers, lanes, kv_heads, max_len, head_dim, dtype)
    room = free_bytes - HEADROOM_BYTES
    if need <= room:
        return
    from conveyor.inference.validate import InputError

    per_lane = need // lanes
    fit = max(room, 0) // per_lane
    name = "float8" if dtype == FP8 else str(dtype).removeprefix("torch.")
    fixes = [
        f"lower the lanes to {fit} or fewer (spec.inference.batchSize, spec.serve.maxBatchSize)"
        if fit
        else None
    ]
    fixes += ["shorten the longest prompt or the new tokens (every lane holds both)"]
    if dtype != FP8:
        fixes += ["store the cache in float8 (spec.model.kvCacheDtype: fp8, half the bytes)"]
    fixes += ["spread the model over more GPUs (spec.parallelism.stages or tensorParallel)"]
    raise InputError(
        f"the KV cache of {lanes} lanes x {max_len} positions ({name}, {layers} layers here) needs "
        f"{need / GIB:.1f} GiB and the GPU has {free_bytes / GIB:.1f} GiB free after the weights "
        f"({HEADROOM_BYTES / GIB:.0f} GiB of it kept for warm-up and prompt passes): "
        + "; ".join(f for f in fixes if f)
    )


class KVCache:
    """One tensor per layer (not one stacked tensor): under torch.compile each layer's cache is then a graph
    input that the decode step writes in place; a write into a view of a larger input is functionalised
    into a copy of the whole input (measured: 5 ms per layer on a 7B model)."""

    def __init__(
        self,
        layers: int,
        lanes: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        if dtype.is_floating_point and dtype.itemsize == 1 and dtype != FP8:
            raise ValueError(f"a KV cache of {dtype} is not supported (float8: {FP8})")
        self.lanes_total, self.max_len = lanes, max_len
        self.length = max_len + 1
        shape = (lanes, kv_heads, self.length, head_dim)
        scaled = dtype == FP8

        def zeros() -> torch.Tensor:  # float8 zeros as zero bytes (CUDA's fill has no float8 case)
            if scaled:
                return torch.zeros(shape, dtype=torch.uint8, device=device).view(FP8)
            return torch.zeros(shape, dtype=dtype, device=device)

        self.k = [zeros() for _ in range(layers)]
        self.v = [zeros() for _ in range(layers)]
        self.k_scale = [torch.zeros(shape[:3], device=device) for _ in range(layers if scaled else 0)]
        self.v_scale = [torch.zeros(shape[:3], device=device) for _ in range(layers if scaled else 0)]

    @property
    def scratch_position(self) -> int:
        return self.max_len

    def layer(self, layer: int) -> LayerCache:
        """The whole layer: (keys, values) [lanes, kv_heads, length, head_dim], then their scales
        [lanes, kv_heads, length] where the cache is float8."""
        if self.k_scale:
            return self.k[layer], self.v[layer], self.k_scale[layer], self.v_scale[layer]
        return self.k[layer], self.v[layer]

    def tensors(self) -> list[torch.Tensor]:
        return [*self.k, *self.v, *self.k_scale, *self.v_scale]

    def check_lanes(self, start: int, n: int) -> None:
        if start < 0 or start + n > self.lanes_total:
            raise IndexError(f"lanes [{start}, {start + n}) outside the cache's {self.lanes_total} lanes")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
