"""The decode kernels against torch on shapes that exercise their edges (uneven tiles, grouped-query
heads, a sliding window, several key splits). Run as a script under ``TRITON_INTERPRET=1`` on the CPU
(float32: the interpreter has no bfloat16 dot) and imported by the GPU tests (bfloat16)."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def skinny_errors(dtype: torch.dtype, device: str) -> list[tuple[str, float, float]]:
    """(case, max error, tolerance) of skinny_matmul against a float64 product."""
    from conveyor.inference.kernels.skinny_matmul import Tiles, skinny_matmul

    torch.manual_seed(0)
    out = []
    for m, n, k, tiles in [
        (1, 64, 256, Tiles(16, 64)),
        (1, 48, 320, Tiles(32, 128)),  # N and K not multiples of the tile: masked loads
        (3, 64, 256, Tiles(16, 64)),
        (16, 80, 200, Tiles(32, 64)),
        (40, 64, 256, Tiles(16, 128)),
        (1, 64, 512, Tiles(16, 64, splits=4)),  # split along K: the last split of a tile adds the sums
        (16, 48, 256, Tiles(32, 64, splits=2)),
        (5, 64, 320, Tiles(16, 64, splits=2)),  # K tiles not a multiple of the splits: the last one short
    ]:
        x = torch.randn(m, k, dtype=dtype, device=device)
        w = torch.randn(n, k, dtype=dtype, device=device)
        ref = x.double() @ w.double().T
        got = skinny_matmul(x, w, tiles).double()
        tol = (1e-4 if dtype == torch.float32 else 2e-2) * ref.abs().max().item()
        out.append((f"M={m} N={n} K={k} {tiles}", (got - ref).abs().max().item(), tol))
        if tiles.splits > 1:  # the arrival counters are left at zero: a second call sums the same way
            again = skinny_matmul(x, w, tiles).double()
            out.append((f"again M={m} N={n} K={k} {tiles}", (again - got).abs().max().item(), 0.0))
        # int8 weights, one scale per output channel: dequantized after the product
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
        scale = torch.rand(n, dtype=dtype, device=device) / 100
        ref = (x.double() @ w8.double().T) * scale.double()
        got = skinny_matmul(x, w8, tiles, scale).double()
        tol = (1e-4 if dtype == torch.float32 else 2e-2) * ref.abs().max().item()
        out.append((f"int8 M={m} N={n} K={k} {tiles}", (got - ref).abs().max().item(), tol))
    for m, n, k, tiles in [
        (1, 64, 256, Tiles(16, 64)),
        (1, 48, 200, Tiles(16, 64)),
        (6, 40, 200, Tiles(32, 64)),
    ]:
        # a gated MLP's gate | up weight [2n, k]: the kernel returns silu(x @ gate^T) * (x @ up^T)
        x = torch.randn(m, k, dtype=dtype, device=device)
        w = torch.randn(2 * n, k, dtype=dtype, device=device)
        gate, up = (x.double() @ w.double().T).chunk(2, dim=-1)
        ref = F.silu(gate) * up
        got = skinny_matmul(x, w, tiles, gate_up=True).double()
        tol = (1e-4 if dtype == torch.float32 else 2e-2) * ref.abs().max().item()
        out.append((f"gate|up M={m} N={n} K={k} {tiles}", (got - ref).abs().max().item(), tol))
        w8 = torch.randint(-127, 128, (2 * n, k), dtype=torch.int8, device=device)
        scale = torch.rand(2 * n, dtype=dtype, device=device) / 100
        gate, up = ((x.double() @ w8.double().T) * scale.double()).chunk(2, dim=-1)
        ref = F.silu(gate) * up
        got = skinny_matmul(x, w8, tiles, scale, gate_up=True).double()
        tol = (1e-4 if dtype == torch.float32 else 2e-2) * ref.abs().max().item()
        out.append((f"int8 gate|up M={m} N={n} K={k} {tiles}", (got - ref).abs().max().item(), tol))
    return out


def op_errors(dtype: torch.dtype, device: str) -> list[tuple[str, float, float]]:
    """(case, max error, tolerance) of the custom ops (decode_linear, decode_gate_up) with a tile choice
    in place against torch's form of the same product: the ops run the chosen kernel and shape its
    output as their input."""
    from conveyor.inference.kernels import skinny_matmul as sm

    torch.manual_seed(0)
    out = []
    x = torch.randn(3, 1, 256, dtype=dtype, device=device)
    for gate_up, tiles in [
        (False, sm.Tiles(16, 64)),
        (False, sm.Tiles(16, 64, splits=2)),
        (True, sm.Tiles(16, 64)),
    ]:
        w = torch.randn(96, 256, dtype=dtype, device=device)
        key = sm._key(96, 256, 3, dtype, w, gate_up)
        ref = (sm._torch_gate_up if gate_up else sm._torch_linear)(x, w, None)
        sm._CHOICES[key] = tiles
        try:
            got = (sm.decode_gate_up if gate_up else sm.decode_linear)(x, w)
        finally:
            del sm._CHOICES[key]
        name = f"op {'decode_gate_up' if gate_up else 'decode_linear'} {tiles}"
        error = (got.double() - ref.double()).abs().max().item() if got.shape == ref.shape else float("inf")
        tol = (1e-4 if dtype == torch.float32 else 2e-2) * ref.abs().max().item()
        out.append((name, error, tol))
    return out


def attention_errors(
    dtype: torch.dtype, device: str, kv_dtype: torch.dtype | None = None
) -> list[tuple[str, float, float]]:
    """(case, max error, tolerance) of decode_attention against SDPA on the same cache slice; with
    ``kv_dtype`` (float8) the cache is stored in it with its scales (kv_cache.quantize) and the
    reference reads the values they stand for."""
    from conveyor.inference.kernels import decode_attention as da
    from conveyor.inference.model.kv_cache import quantize

    torch.manual_seed(0)
    out = []
    d = 64
    cases = [
        (2, 4, 2, 100, 1, None, 40, False, False, False),  # GQA, two splits
        (1, 8, 8, 300, 0, None, 40, False, False, False),  # five splits, the last one short
        (3, 6, 2, 70, 2, 16, 40, False, False, False),  # sliding window: whole blocks masked out
        (2, 8, 8, 129, 0, None, 1, True, False, False),  # one split: written directly, no combine
        (2, 4, 4, 300, 0, None, 1, False, False, False),  # one split of five blocks: three stages
        # contexts far below kv_len (a captured step reads the whole cache's length): the splits past
        # a query's position end at once, and lanes in any order
        (3, 4, 2, 300, 1, None, 40, False, True, False),
        # an idle lane of a captured step (kv_len the whole cache) at the scratch slot reads nothing:
        # with splits and combined, with one split, and under a sliding window
        (3, 4, 2, 320, 0, None, 40, False, True, True),
        (2, 8, 8, 129, 0, None, 1, False, False, True),
        (3, 6, 2, 140, 2, 16, 40, False, False, True),
    ]
    if kv_dtype is not None:  # splits and combine, one split, a window, an idle lane: enough for a cast
        cases = [cases[0], cases[2], cases[3], cases[6]]
    for n, heads, kv_heads, kv_len, start, window, programs, idle, short, scratch in cases:
        q = torch.randn(n, heads, 1, d, dtype=dtype, device=device)
        length = kv_len if scratch else kv_len + 20  # a captured step's kv_len is the whole cache
        k_cache = torch.randn(start + n + 1, kv_heads, length, d, dtype=dtype, device=device)
        v_cache = torch.randn_like(k_cache)
        scales: tuple[torch.Tensor, ...] = ()
        if kv_dtype is not None:  # scales far from 1: a kernel that ignores them is far off
            (k_cache, k_scale), (v_cache, v_scale) = quantize(k_cache * 40), quantize(v_cache / 50)
            scales = (k_scale, v_scale)
        top = kv_len - 1 if scratch else kv_len  # the last slot is the scratch slot's
        positions = torch.randint(kv_len // 2, top, (n,), device=device)
        positions[0] = top - 1
        lanes = torch.arange(start, start + n, device=device)
        if short:
            positions = torch.tensor([0, 40, 70][:n], device=device)
            lanes = lanes.flip(0)
        if idle:  # an idle lane sits at the scratch slot, past kv_len: it sees all of [0, kv_len)
            positions[-1] = kv_len + 10
        keys = torch.arange(kv_len, device=device)
        if scratch:
            positions[-1] = length - 1
        mask = keys[None, :] <= positions[:, None]
        if window:
            mask &= keys[None, :] > positions[:, None] - window
        if scratch:
            mask[-1] = False
        mask = mask[:, None, None, :]
        scale = 1 / math.sqrt(d)
        k = k_cache.double()[lanes, :, :kv_len]  # (widened first: CUDA's gather has no float8 case)
        v = v_cache.double()[lanes, :, :kv_len]
        if scales:
            k, v = k * scales[0][lanes, :, :kv_len, None], v * scales[1][lanes, :, :kv_len, None]
        ref = F.scaled_dot_product_attention(
            q.double(), k, v, attn_mask=mask, scale=scale, enable_gqa=kv_heads != heads
        )
        if scratch:
            ref[-1] = 0.0  # a query that sees no key gets zeros (SDPA's fully masked row is NaN)
        # Slots a query does not see may hold anything (a lane's earlier sequence): poisoned here, so a
        # kernel that reads them (and multiplies by a zero probability) returns NaN.
        hidden = ~mask[:, 0, 0, :, None]  # [n, kv_len, 1]
        for cache in (k_cache, v_cache):
            seen = cache.float()[lanes, :, :kv_len]  # [n, kv_heads, kv_len, d]
            poisoned = seen.masked_fill(hidden[:, None], float("nan")).to(cache.dtype)
            cache.view(torch.uint8)[lanes, :, :kv_len] = poisoned.view(torch.uint8)  # (bytes: any dtype)
        for cache in scales:
            cache[lanes, :, :kv_len] = cache[lanes, :, :kv_len].masked_fill(
                hidden[:, None, :, 0], float("nan")
            )
        saved, da.TARGET_PROGRAMS = da.TARGET_PROGRAMS, programs
        try:
            got = da.decode_attention(
                q, k_cache, v_cache, positions[:, None], lanes, kv_len, window or 0, scale, *scales
            ).double()
            splits, blocks_per_split = da.split_keys(n, kv_heads, kv_len, da.TILES[bool(scales)][0])
        finally:
            da.TARGET_PROGRAMS = saved
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        if scales:  # (the values are 40x and 1/50 of randn's)
            tol *= ref.abs().max().item()
        out.append(
            (
                f"{'float8 cache ' if kv_dtype else ''}"
                f"n={n} heads={heads}/{kv_heads} kv_len={kv_len} window={window} splits={splits} "
                f"stages={da.stages(blocks_per_split, bool(scales))}{' idle lane at the scratch slot' if scratch else ''}",
                (got - ref).abs().max().item(),
                tol,
            )
        )
    return out


def elementwise_errors(dtype: torch.dtype, device: str) -> list[tuple[str, float, float]]:
    """(case, max error, tolerance) of elementwise.py's kernels against the model's own torch forms
    (Norm without its kernel, ``F.silu(gate) * up``, apply_rotary), on widths that are not a power of
    two, several column programs, grouped-query heads and a partial rotary dim."""
    from types import SimpleNamespace

    from conveyor.inference.kernels import elementwise as ew
    from conveyor.inference.model.stage_model import Norm, apply_rotary

    torch.manual_seed(0)
    out = []
    rel = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the output at most
    for shape in [(5, 96), (2, 3, 64), (1, 1, 4096)]:
        norm = Norm(SimpleNamespace(norm="rms", norm_eps=1e-6), shape[-1]).to(device, dtype)  # type: ignore[arg-type]
        with torch.no_grad():
            norm.weight.normal_()
        x = torch.randn(shape, dtype=dtype, device=device) * 3
        with torch.inference_mode():
            ref, got = norm(x), ew.rms_norm(x, norm.weight, norm.eps)
        error = (got.double() - ref.double()).abs().max().item() if got.shape == ref.shape else float("inf")
        out.append((f"rms_norm {shape}", error, rel * ref.abs().max().item()))
    for shape in [(4, 2 * 80), (2, 3, 2 * 1500)]:  # the second: two column programs, the last short
        h = torch.randn(shape, dtype=dtype, device=device) * 4
        gate, up = h.chunk(2, dim=-1)
        ref, got = F.silu(gate) * up, ew.silu_mul(h)
        error = (got.double() - ref.double()).abs().max().item() if got.shape == ref.shape else float("inf")
        out.append((f"silu_mul {shape}", error, rel * ref.abs().max().item()))
    for n, s, heads, kv_heads, d, rot in [
        (2, 5, 4, 2, 16, 16),  # grouped-query: 6 heads rotated, in a tile of 8
        (1, 3, 2, 2, 32, 8),  # a prefix of each head rotated (GPT-NeoX)
        (3, 1, 4, 4, 64, 64),
        (1, 2, 3, 1, 80, 20),  # half a rotary dim of 10, in a tile of 16
    ]:
        qkv = torch.randn(n, s, (heads + 2 * kv_heads) * d, dtype=dtype, device=device)
        inv = 1.0 / 10000 ** (torch.arange(0, rot, 2, device=device).float() / rot)
        angles = torch.randint(0, 500, (n, s), device=device).float()[..., None] * inv
        emb = torch.cat((angles, angles), dim=-1)[:, None]  # [n, 1, S, rot] as StageModel makes them
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        want_q = apply_rotary(q.view(n, s, heads, d).transpose(1, 2), cos, sin)
        want_k = apply_rotary(k.view(n, s, kv_heads, d).transpose(1, 2), cos, sin)
        want_v = v.clone()
        ew.rotary_(qkv, cos, sin, heads + kv_heads, d)
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        got_q, got_k = q.view(n, s, heads, d).transpose(1, 2), k.view(n, s, kv_heads, d).transpose(1, 2)
        error = max((got_q - want_q).abs().max().item(), (got_k - want_k).abs().max().item())
        error = error if torch.equal(v, want_v) else float("inf")  # v untouched
        case = f"rotary_ n={n} S={s} heads={heads}/{kv_heads} D={d} rotary={rot}"
        out.append((case, error, rel * max(want_q.abs().max().item(), 1.0)))
    from conveyor.inference.model import kv_cache

    for n, s, heads, kv_heads, d in [(2, 5, 4, 2, 16), (3, 1, 6, 3, 64), (1, 6, 2, 1, 16)]:
        qkv = torch.randn(n, s, (heads + 2 * kv_heads) * d, dtype=dtype, device=device)
        lanes = torch.tensor([4, 0, 2][:n], device=device)[:, None]
        if n == 1:  # prompts packed in one row: a lane per token
            lanes = torch.tensor([[3, 3, 1, 1, 1, 4]], device=device)
        positions = torch.arange(s, device=device).repeat(n, 1) + torch.arange(n, device=device)[:, None]
        positions[0, -1] = 11  # a padding token at the scratch slot
        want = [torch.zeros(5, kv_heads, 12, d, dtype=dtype, device=device) for _ in range(2)]
        got = [t.clone() for t in want]
        _, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        k, v = (t.view(n, s, kv_heads, d).transpose(1, 2) for t in (k, v))
        kv_cache.write((want[0], want[1]), lanes, positions, k, v)
        ew.write_kv_(qkv, got[0], got[1], lanes, positions, heads, kv_heads)
        same = all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        out.append((f"write_kv_ n={n} S={s} heads={heads}/{kv_heads} D={d}", 0.0 if same else 1.0, 0.0))
        if device == "cpu" or torch.cuda.get_device_capability() >= (8, 9):
            out.append(float8_write_error(qkv, lanes, positions, heads, kv_heads))
    return out


def float8_write_error(
    qkv: torch.Tensor, lanes: torch.Tensor, positions: torch.Tensor, heads: int, kv_heads: int
) -> tuple[str, float, float]:
    """``write_kv_`` into a float8 cache: its scales and bytes as kv_cache.write makes them, exactly.
    The values spread over 1e-3..1e3 (one scale a vector, so each vector needs its own)."""
    from conveyor.inference.kernels import elementwise as ew
    from conveyor.inference.model import kv_cache

    n, s, _ = qkv.shape
    d = qkv.shape[-1] // (heads + 2 * kv_heads)
    gen = torch.Generator().manual_seed(2)
    spread = torch.logspace(-3, 3, qkv.shape[-1])[torch.randperm(qkv.shape[-1], generator=gen)]
    qkv = (qkv * spread.to(qkv.device, qkv.dtype)).contiguous()
    _, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    k, v = (t.view(n, s, kv_heads, d).transpose(1, 2) for t in (k, v))
    want = [torch.zeros(5, kv_heads, 12, d, device=qkv.device).to(kv_cache.FP8) for _ in range(2)]
    want += [torch.zeros(5, kv_heads, 12, device=qkv.device) for _ in range(2)]
    got = [t.clone() for t in want]
    with interpreter_float8():
        kv_cache.write(tuple(want), lanes, positions, k, v)
    ew.write_kv_(qkv, *got[:2], lanes, positions, heads, kv_heads, *got[2:])
    same = all(
        torch.equal(g.view(torch.uint8), w.view(torch.uint8)) for g, w in zip(got[:2], want[:2], strict=True)
    )
    same &= all(torch.equal(g, w) for g, w in zip(got[2:], want[2:], strict=True))
    return (f"write_kv_ float8 n={n} S={s} heads={heads}/{kv_heads} D={d}", 0.0 if same else 1.0, 0.0)


@contextlib.contextmanager
def interpreter_float8() -> Iterator[None]:
    """Under ``TRITON_INTERPRET=1``, ``kv_cache.quantize`` converts to float8 with the interpreter, as
    the kernels there do: its conversion does not carry a rounding into the exponent (1.96 -> 1.0, not
    2.0), so torch's would differ from a kernel's. On a GPU the conversion is the hardware's, compared
    with torch's as it is."""
    from conveyor.inference.model import kv_cache

    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    quantize = kv_cache.quantize

    def interpreter_quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = quantize(t)[1]
        x = (t.float() / scale[..., None]).contiguous()
        values = torch.zeros(x.shape, device=x.device).to(kv_cache.FP8)
        _to_float8[(1,)](x, values, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
        return values, scale

    kv_cache.quantize = interpreter_quantize
    try:
        yield
    finally:
        kv_cache.quantize = quantize


if triton is not None:

    @triton.jit
    def _to_float8(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n).to(y_ptr.dtype.element_ty), mask=i < n)


def eager_model_errors() -> list[tuple[str, float, float]]:
    """A whole eager stage model (a prefill of two prompts, one padded, then decode steps, float32 on
    the CPU) with elementwise.py's kernels installed and taken and its prompts packed in one row,
    against the same model without either: the wiring of Norm, MLP and Attention (the rotary of q's and
    k's heads in the qkv rows in place, the cache written from them per token), and a float8 cache,
    which the write kernel quantizes."""
    import tempfile

    from conveyor.inference.kernels import elementwise as ew
    from conveyor.inference.kernels import packed_attention
    from conveyor.testing.reference import one_process_rank
    from conveyor.testing.tiny import save_tiny

    out = []
    taken: list[str] = []
    quantized: list[bool] = []
    serves, write_kv_ = ew.serves, ew.write_kv_

    def write_kv_seen(*args: Any, **kwargs: Any) -> None:
        quantized.append(len(args) > 7)  # a float8 cache's scales after the heads
        write_kv_(*args, **kwargs)

    cases = [("llama", "auto"), ("gpt_neox", "auto"), ("qwen2", "auto"), ("llama", "fp8")]
    for family, kv_dtype in cases:
        with tempfile.TemporaryDirectory() as tmp, interpreter_float8():
            model_dir = save_tiny(family, tmp, tokenizer=False)
            ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
            results = []
            for fused in (False, True):
                model, _ = one_process_rank(model_dir, lanes=2, max_len=16, kv_cache_dtype=kv_dtype)
                if fused:
                    installed = ew.install(model)
                    model.packed_attention = packed_attention.attend

                    def on_cpu(*tensors: torch.Tensor, family: str = family) -> bool:
                        taken.append(family)
                        return True

                    ew.serves = on_cpu  # the interpreter runs the kernels on CPU float32 tensors
                    ew.write_kv_ = write_kv_seen
                try:
                    lanes = torch.tensor([1, 0])
                    positions = torch.arange(5).repeat(2, 1)
                    positions[1, 3:] = 16  # the second prompt is 3 tokens, padded at the scratch slot
                    lengths = torch.tensor([[5], [3]])
                    with torch.inference_mode():
                        steps = [model(ids[:, :5], positions, prefill=True, lanes=lanes)]
                        for t in range(5, 9):
                            at = lengths + t - 5
                            steps.append(model(ids[:, t : t + 1], at, lanes=lanes, kv_len=9))
                    results.append(torch.cat([x.reshape(2, -1) for x in steps], 1))
                finally:
                    ew.serves, ew.write_kv_ = serves, write_kv_
            error = (results[1] - results[0]).abs().max().item()
            if kv_dtype == "fp8" and not all(quantized[-5:]):  # the prefill and 4 steps
                error = float("inf")
            out.append(
                (
                    f"eager {family} model{' with a float8 cache' if kv_dtype == 'fp8' else ''},"
                    f" {installed} modules fused",
                    error,
                    1e-4 * results[0].abs().max().item(),
                )
            )
    assert set(taken) == {"llama", "gpt_neox", "qwen2"}
    return out


if __name__ == "__main__":
    failed = 0
    cases = skinny_errors(torch.float32, "cpu") + op_errors(torch.float32, "cpu")
    cases += attention_errors(torch.float32, "cpu") + attention_errors(
        torch.float32, "cpu", torch.float8_e4m3fn
    )
    cases += elementwise_errors(torch.float32, "cpu") + eager_model_errors()
    for case, err, tol in cases:
        ok = err <= tol
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {case}: error {err:.2e} (tolerance {tol:.2e})")
    sys.exit(1 if failed else 0)
