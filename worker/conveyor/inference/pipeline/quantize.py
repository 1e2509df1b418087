"""Weight-only int8 quantization of the transformer blocks (gpt-fast style).

Every linear of a block (attention ``wqkv``/``wo``, MLP ``w_in``/``w_out``) becomes an ``Int8Linear``:
int8 weights ``[out, in]`` and one scale per output channel, symmetric absmax (``scale = absmax / 127``).
Its forward is ``F.linear(x, w.to(x.dtype)) * scale``; at decode on a GPU the same product runs through
skinny_matmul.py's kernel, which reads the int8 bytes once and converts them in registers, so decode
reads 1 byte per weight instead of 2 (inductor's own lowering of the form was 13x slower than bf16).
Activations, the KV cache, embeddings, norms and the LM head stay in the compute dtype.

Why the head stays in full precision by default: its outputs *are* the logits, and a vocabulary-wide
matmul is where a per-channel error shows up directly in the token choice (each row's rounding error
moves one logit); the block linears' errors are averaged by the residual stream and the norms.
``head=True`` quantizes it too (for memory-bound cases with a large vocabulary).

Tensor parallelism: each rank quantizes its own slice *after* sharding. A column-parallel slice's
per-output-channel scales are exactly the slice of the full matrix's scales. A row-parallel slice holds
every output channel but only part of the inputs, so its local absmax would differ per rank; with a
``tensor_group`` the ranks agree on the full-matrix absmax (one all-reduce MAX of ``[out]`` per layer at
load), so every layout computes the same quantized weights as one process.

Quantize *before* ``add_all_reduce_hooks``: the hooks live on the modules this replaces (refused
otherwise). ``generate.prepare_rank`` orders it.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from torch import nn

from conveyor.inference.kernels import skinny_matmul
from conveyor.inference.model.stage_model import StageModel

Quantization = Literal["none", "int8"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
INT8_MAX = 127
BLOCK_LINEARS = ("attn.wqkv", "attn.wo", "mlp.w_in", "mlp.w_out")
ROW_PARALLEL = ("wo", "w_out")  # their input dimension is split across tensor-parallel ranks


class Int8Linear(nn.Module):
    """``y = (x @ int8_weight.T) * scale + bias``; weight int8 [out, in], scale and bias [out]."""

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2 or scale.shape != weight.shape[:1]:
            raise ValueError(
                f"Int8Linear needs an int8 weight [out, in] and a scale [out]; got weight "
                f"{weight.dtype} {list(weight.shape)}, scale {list(scale.shape)}"
            )
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, absmax: torch.Tensor | None = None, device: torch.device | None = None
    ) -> Int8Linear:
        """Quantize ``linear`` (on ``device``, default its own); ``absmax`` [out] overrides the rows' own."""
        w = linear.weight.detach().to(device)
        weight, scale = quantize_weight(w, absmax)
        bias = None if linear.bias is None else linear.bias.detach().to(device)
        return cls(weight, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = skinny_matmul.linear(x, self.weight, self.scale)  # at decode, reads the int8 bytes once
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, in the scale's dtype: int8 * scale per row."""
        return self.weight.to(self.scale.dtype) * self.scale[:, None]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, int8"


def row_absmax(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] -> float32 absmax per output channel [out]."""
    return weight.detach().abs().amax(dim=1).float()


def quantize_weight(
    weight: torch.Tensor, absmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight [out, in] -> (int8 [out, in], scale [out] in weight's dtype).

    The integers are rounded against the *stored* scale (already in the compute dtype), so
    ``int8 * scale`` is the nearest representable weight; all-zero rows get scale 1 (their int8 is 0).
    """
    amax = row_absmax(weight) if absmax is None else absmax.float()
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax)).to(weight.dtype)
    q = torch.round(weight.float() / scale.float()[:, None]).clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def quantize_int8(
    model: StageModel,
    *,
    tensor_group: Any = None,
    device: torch.device | str | None = None,
    head: bool = False,
) -> StageModel:
    """Replace the block linears of ``model`` (and the LM head if ``head``) by ``Int8Linear`` in place.

    One linear at a time: its weight is read (moved to ``device`` if given), quantized there, and the
    full-precision module dropped, so with the model on the host and ``device`` a GPU, the GPU holds
    the int8 model plus one layer's full-precision weight at most. ``tensor_group``: the tensor-parallel
    group of this stage (row-parallel scales are agreed over it; see the module docstring).
    """
    dev = torch.device(device) if device is not None else None
    targets = [f"layers.{i}.{name}" for i in range(len(model.layers)) for name in BLOCK_LINEARS]
    if head and getattr(model, "lm_head", None) is not None:
        targets.append("lm_head")
    for path in targets:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        linear = getattr(parent, attr)
        if isinstance(linear, Int8Linear):
            continue
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{path} is a {type(linear).__name__}, not nn.Linear: cannot quantize it")
        if linear._forward_hooks or linear._forward_pre_hooks:
            raise ValueError(
                f"{path} has forward hooks (the tensor-parallel all-reduce?): quantize before "
                "add_all_reduce_hooks, so the hooks land on the int8 modules"
            )
        absmax = None
        if tensor_group is not None and attr in ROW_PARALLEL:
            absmax = row_absmax(linear.weight.detach().to(dev))
            dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=tensor_group)
        setattr(parent, attr, Int8Linear.from_linear(linear, absmax=absmax, device=dev))
        del linear  # the last reference: the full-precision weight is freed here
    return model


def int8_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of int8 weights + their scales, bytes of every other parameter and buffer) of ``model``."""
    quantized = other = 0
    for module in model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        size = sum(t.numel() * t.element_size() for t in tensors)
        if isinstance(module, Int8Linear):
            quantized += size
        else:
            other += size
    return quantized, other


def compare_logits(reference: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    """reference, test [..., vocab] -> relative L2 error per position (mean, max) and top-1 agreement."""
    ref, tst = reference.float().flatten(0, -2), test.float().flatten(0, -2)  # [positions, vocab]
    rel = (tst - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-12)
    return {
        "rel_logit_error_mean": rel.mean().item(),
        "rel_logit_error_max": rel.max().item(),
        "top1_agreement": (ref.argmax(-1) == tst.argmax(-1)).float().mean().item(),
        "positions": float(ref.shape[0]),
    }


@torch.no_grad()
def all_logits(model: StageModel, tokens: torch.Tensor) -> torch.Tensor:
    """Float32 logits at every position [n, S, vocab] of a single-stage model (teacher forcing);
    needs ``setup_cache`` with at least n lanes and S positions."""
    if not (model.first and model.last):
        raise ValueError("all_logits needs the whole model in one stage (stages=1)")
    n, s = tokens.shape
    positions = torch.arange(s, device=tokens.device).expand(n, s)
    model.last = False  # why: forward returns the last token's logits only; take the hidden states
    try:
        hidden = model(tokens, positions)  # [n, S, hidden]
    finally:
        model.last = True
    return model.head(hidden)
