"""RMSNorm inside the decode step's products: no kernel of its own between a layer's products.

A pre-norm layer's decode step runs ``h = x + wo(attn(norm1(x)))`` then ``h + w_out(mlp(norm2(h)))``.
Compiled, inductor fuses each residual add with the norm after it, but that is still a kernel of its
own twice a layer: at batch 64 on an H200, 64 kernels of 64 programs (one row each) that took 0.15 ms
of a 5.5 ms step, mostly their fixed cost. Here the output projections (``wo``, ``w_out``) add the
residual in their epilogue and write each column tile's share of each row's sum of squares
(skinny_matmul's ``RESIDUAL``); the next product (``wqkv``, the gate | up) reads those partial sums,
takes 1 / rms of each row from them and normalises its input tiles as it loads them (``NORM``), with
model.Norm's rounding. A norm needs the whole row, which no single program of its producer sees; the
partial sums carry the row's reduction across the kernels that are there anyway.

Like the products themselves this is measured, not assumed: ``tune`` times the fused products (their
best tiles) against the plain ones as chosen plus the residual-norm kernel inductor would run, once
per micro-batch size, and a layer takes the fused path only where that is faster. ``route_norms``
applies it to the layers it suits (pre-norm RMSNorm, a silu-gated MLP, no biases on the products that
add a residual, no forward hooks: tensor parallelism's all-reduce must run before the residual add).
Off until measured on a GPU (built and checked on the CPU through Triton's interpreter in a session
that was lent none): ``CONVEYOR_FUSED_NORMS=1`` turns it on, and tune then still keeps the plain layer
wherever that measures faster.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from typing import NamedTuple

import torch
from torch import nn

from conveyor.inference import skinny_matmul as sm
from conveyor.inference.model import Block, Norm, Step

log = logging.getLogger(__name__)

# (kind, product key) -> the tiles of the fused product; kind "norm" (input normalised inside) or
# "residual" (residual added, sums of squares written)
_TILES: dict[tuple[str, sm.Key], sm.Tiles] = {}
# (rows, layer shapes key) -> whether the fused layer measured faster than the plain one
_PAYS: dict[tuple[int, str], bool] = {}


def enabled() -> bool:
    return os.environ.get("CONVEYOR_FUSED_NORMS", "0").strip().lower() in ("1", "true", "yes", "on")


def _rms_input(x: torch.Tensor, norm: sm.Norming) -> torch.Tensor:
    # model.Norm's RMSNorm, its mean of squares taken from the partial sums
    inv = torch.rsqrt(norm.sumsq.sum(0) / x.shape[-1] + norm.eps)  # [rows]
    x32 = x.reshape(-1, x.shape[-1]).float() * inv[:, None]
    return norm.weight * x32.to(x.dtype).view_as(x)


@torch.library.custom_op("conveyor::decode_norm_linear", mutates_args=())
def decode_norm_linear(
    x: torch.Tensor,
    sumsq: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    gate_up: bool = False,
) -> torch.Tensor:
    """``F.linear(RMSNorm(x), weight)`` (``gate_up``: ``F.silu(gate) * up`` of it), the norm's mean of
    squares from ``sumsq`` [parts, rows], the partial sums its producer wrote."""
    norm = sm.Norming(norm_weight, eps, sumsq)
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    tiles = _TILES.get(("norm", sm._key(weight.shape[0], k, rows.shape[0], x.dtype, weight, gate_up)))
    if tiles is None:
        xn = _rms_input(x, norm)
        return (sm._torch_gate_up if gate_up else sm._torch_linear)(xn, weight, scale)
    y = sm.skinny_matmul(rows.contiguous(), weight, tiles, scale, gate_up, norm=norm)
    return y.view(*x.shape[:-1], y.shape[-1])


@decode_norm_linear.register_fake
def _(x, sumsq, norm_weight, eps, weight, scale=None, gate_up=False):  # type: ignore[no-untyped-def]
    return x.new_empty(*x.shape[:-1], weight.shape[0] // (2 if gate_up else 1))


def _residual_tiles(x: torch.Tensor, weight: torch.Tensor) -> sm.Tiles | None:
    k = x.shape[-1]
    return _TILES.get(("residual", sm._key(weight.shape[0], k, x.numel() // k, x.dtype, weight)))


@torch.library.custom_op("conveyor::decode_linear_residual", mutates_args=())
def decode_linear_residual(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual + F.linear(x, weight)``, and the partial sums of its rows' squares [parts, rows]
    (float32) that the next ``decode_norm_linear`` reads."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    tiles = _residual_tiles(x, weight)
    if tiles is None:
        out = residual + sm._torch_linear(x, weight, scale)
        return out, out.reshape(rows.shape[0], -1).float().pow(2).sum(-1)[None]
    n = weight.shape[0]
    sumsq = torch.empty((sm.column_tiles(n, tiles), rows.shape[0]), device=x.device, dtype=torch.float32)
    res = residual.reshape(rows.shape[0], n).contiguous()
    out = sm.skinny_matmul(rows.contiguous(), weight, tiles, scale, residual=res, sumsq=sumsq)
    return out.view(*x.shape[:-1], n), sumsq


@decode_linear_residual.register_fake
def _(x, weight, residual, scale=None):  # type: ignore[no-untyped-def]
    tiles = _residual_tiles(x, weight)
    parts = 1 if tiles is None else sm.column_tiles(weight.shape[0], tiles)
    rows = x.numel() // x.shape[-1]
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(parts, rows, dtype=torch.float32)


class Layer(NamedTuple):
    """One routed layer: its four products (weight and int8 scale of each) and its first norm."""

    qkv: sm.Product
    out: sm.Product
    gate_up: sm.Product
    down: sm.Product
    norm: Norm  # its dtype is the activations', and its kernel is the plain layer's cost

    def key(self, dtype: torch.dtype) -> str:
        products = (self.qkv, self.out, self.gate_up, self.down)
        return ",".join(f"{tuple(p.weight.shape)}:{p.weight.dtype}" for p in products) + f":{dtype}"


def _product(module: nn.Module, gate_up: bool = False) -> sm.Product:
    return sm.Product(module.weight, sm._int8(module), gate_up)  # type: ignore[arg-type]


def _suits(block: nn.Module) -> bool:
    if not isinstance(block, Block) or not block.pre_norm or block.parallel_residual:
        return False
    attn, mlp = block.attn, block.mlp
    norms_ok = all(n.rms for n in (block.attn_norm, block.mlp_norm))
    products = (attn.wqkv, attn.wo, mlp.w_in, mlp.w_out)
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in (block, attn, mlp, *products))
    plain = all(type(m) is nn.Linear or sm._int8(m) is not None for m in products)
    unbiased = attn.wo.bias is None and mlp.w_in.bias is None and mlp.w_out.bias is None
    return norms_ok and plain and unbiased and not hooked and mlp.gated_activation == "silu"


@torch.compiler.assume_constant_result
def _fused(rows: int, key: str) -> bool:
    # a constant to torch.compile: tune decides before the step that asks is traced, and never again
    return _PAYS.get((rows, key), False)


def _fused_forward(
    block: Block,
    layer: Layer,
    plain,
    x: torch.Tensor,
    step: Step,
    cache,  # type: ignore[no-untyped-def]
) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if not (sm.is_decode_product(x) and _fused(rows, layer.key(x.dtype))):
        step.sumsq = None  # the next layer's input is not this x's producer's
        return plain(x, step, cache)
    attn = block.attn
    sumsq = step.sumsq
    if sumsq is None:  # the stage's first layer: its input comes from the embedding or another stage
        sumsq = x.reshape(rows, -1).float().pow(2).sum(-1)[None]
    qkv = decode_norm_linear(x, sumsq, block.attn_norm.weight, block.attn_norm.eps, *layer.qkv[:2])
    if attn.wqkv.bias is not None:
        qkv = qkv + attn.wqkv.bias
    x, sumsq = decode_linear_residual(attn.attend(qkv, step, cache), layer.out.weight, x, layer.out.scale)
    gated = decode_norm_linear(x, sumsq, block.mlp_norm.weight, block.mlp_norm.eps, *layer.gate_up[:2], True)
    x, sumsq = decode_linear_residual(gated, layer.down.weight, x, layer.down.scale)
    step.sumsq = sumsq
    return x


def route_norms(model: nn.Module) -> list[Layer]:
    """Give every layer of ``model`` that suits it (module docstring) the fused decode forward, which
    falls back to the layer's own forward where tune did not find it faster; all layers or none, since a
    fused layer hands the next its sums of squares. Returns the layers' products, for ``tune``."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    on_gpu = all(b.attn_norm.weight.is_cuda for b in blocks)
    if not (sm.triton is not None and sm.kernels_enabled() and enabled() and blocks and on_gpu):
        return []
    return route_blocks(blocks)


def route_blocks(blocks: list[Block]) -> list[Layer]:
    """route_norms on these layers, wherever their weights are (the CPU tests run it through Triton's
    interpreter)."""
    if not all(_suits(b) for b in blocks):
        return []
    layers = []
    for block in blocks:
        attn, mlp = block.attn, block.mlp
        layer = Layer(
            _product(attn.wqkv),
            _product(attn.wo),
            _product(mlp.w_in, True),
            _product(mlp.w_out),
            block.attn_norm,
        )
        plain = Block.forward.__get__(block)  # its own forward, not a routed one: routing twice is once
        block.forward = partial(_fused_forward, block, layer, plain)  # type: ignore[method-assign]
        layers.append(layer)
    return layers


def _norm_kernel_us(norm: Norm, rows: int) -> float:
    """What a plain layer pays for each of its norms: inductor's residual add and RMSNorm kernel, as the
    compiled step runs it between two products."""

    def residual_norm(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + y
        return h, norm(h)

    compiled = torch.compile(residual_norm, dynamic=False)
    weight = norm.weight
    xs = [torch.randn(rows, weight.shape[0], device=weight.device, dtype=weight.dtype) for _ in range(2)]
    with torch.inference_mode():
        return sm.time_in_graph(lambda i: compiled(xs[i % 2], xs[(i + 1) % 2]), 8)


def _time_fused(kind: str, x: torch.Tensor, group: list[sm.Product], tiles: sm.Tiles) -> float:
    """Microseconds per fused product over ``group``: normalising its input (``norm``) or adding a
    residual and writing its sums of squares (``residual``)."""
    m = x.shape[0]
    if kind == "norm":
        weight = torch.ones(x.shape[1], device=x.device, dtype=x.dtype)
        norm = sm.Norming(weight, 1e-5, torch.rand(4, m, device=x.device) + 1)

        def product(i: int) -> torch.Tensor:
            w, scale, gate_up = group[i % len(group)]
            return sm.skinny_matmul(x, w, tiles, scale, gate_up, norm=norm)

    else:
        n = group[0].weight.shape[0]
        residual = torch.randn(m, n, device=x.device, dtype=x.dtype)
        sumsq = torch.empty(sm.column_tiles(n, tiles), m, device=x.device, dtype=torch.float32)

        def product(i: int) -> torch.Tensor:
            w, scale, _ = group[i % len(group)]
            return sm.skinny_matmul(x, w, tiles, scale, residual=residual, sumsq=sumsq)

    with torch.inference_mode():
        return sm.time_in_graph(product, max(len(group), 8))


def tune(layers: list[Layer], m: int) -> None:
    """For micro-batches of ``m`` rows: each fused product's best tiles, and whether the fused layer
    beats the plain one (its products as skinny_matmul.tune chose them, which must have run first, and
    two residual-norm kernels). Decided once per (m, layer shapes)."""
    if not layers or m > sm.MAX_ROWS:
        return
    first = layers[0]
    dtype = first.norm.weight.dtype
    decided = (m, first.key(dtype))
    if decided in _PAYS:
        return
    fused_us = plain_us = 0.0
    for kind, field in (("norm", "qkv"), ("residual", "out"), ("norm", "gate_up"), ("residual", "down")):
        group: list[sm.Product] = [getattr(layer, field) for layer in layers]
        w, _, gate_up = group[0]
        n, k = w.shape
        key = sm._key(n, k, m, dtype, w, gate_up)
        if key not in sm._TIMES:  # the plain product was not timed (chosen by hand): nothing to beat
            _PAYS[decided] = False
            return
        plain_us += sm._TIMES[key]
        x = torch.randn(m, k, device=w.device, dtype=dtype)
        best: tuple[float, sm.Tiles | None] = (float("inf"), None)
        for tiles in sm.candidates(m, w.dtype, n // 2 if gate_up else n, k, gate_up):
            try:
                us = _time_fused(kind, x, group, tiles)
            except Exception as e:  # a tile shape this GPU cannot run (shared memory) is skipped
                log.debug("fused %s %s on %sx%s: %s", kind, tiles, n, k, e)
                continue
            if us < best[0]:
                best = (us, tiles)
        if best[1] is None:
            _PAYS[decided] = False
            return
        _TILES[(kind, key)] = best[1]
        fused_us += best[0]
    plain_us += 2 * _norm_kernel_us(first.norm, m)
    _PAYS[decided] = fused_us < plain_us
    log.info(
        "decode layer at %d rows: norms inside the products %.1f us, plain %.1f us (two norm kernels "
        "included): %s",
        m,
        fused_us,
        plain_us,
        "fused" if _PAYS[decided] else "plain",
    )
