"""Tensor-parallel training (Megatron style) for the decoder layers hf_layers.py builds.

The layers are built from ``local_arch`` (this rank's heads and MLP columns, the inference side's
widths) and their four linears are swapped for parallel ones, after the model is built and before any
weight moves: ``attn.wqkv`` and ``mlp.w_in`` column-parallel (output rows split by heads / by MLP
columns, as the inference loader's ``Shard`` reads them), ``attn.wo`` and ``mlp.w_out`` row-parallel
(input columns split). The autograd of the two seams, over the tensor group only:

- column-parallel input: identity forward, all-reduce backward (each rank's gradient w.r.t. the
  replicated input covers only its own columns; the true one is their sum);
- row-parallel output: all-reduce forward (each rank holds a partial product), identity backward (the
  summed output is replicated, so its gradient already is the same full tensor on every rank).

A row-parallel bias is whole on every rank and added once, after the all-reduce. Norms are replicated;
their gradients come out equal on every tensor rank (``replicated_gradient_gaps`` checks that). The
embedding and head are split over the vocabulary (vocab_parallel.py). Modules name their sharded parameters in ``tensor_parallel_sharded``: the engine reads it to
count their squares across the tensor group in the gradient norm and to key their checkpoint entries by
tensor rank (pipe/sharding.py). ``mark_layouts`` names how each of the four linears splits, whether it is
split or not (at tensorParallel 1 too), so that a checkpoint resumes with another tensorParallel
(pipe/reshard.py cuts the saved shards).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from conveyor.inference.model.families import Arch, name_map
from conveyor.inference.pipeline.tensor_parallel import TensorParallelError, check_divisible, plan_layer
from conveyor.pipe.module import PipelineModule
from conveyor.pipe.sharding import LAYOUT_ATTR, ShardLayout, sharded_parameters

if TYPE_CHECKING:
    from conveyor.train.hf_layers import Role

COLUMN_PARALLEL = ("attn.wqkv", "mlp.w_in")
ROW_PARALLEL = ("attn.wo", "mlp.w_out")


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; backward sums the ranks' partial input gradients (column-parallel input)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        # why: each rank's columns see only their share of d loss / d input; the input's gradient is the sum
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """All-reduce forward (sum of the row-parallel partial products); identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        x = x.contiguous().clone()
        # why: each rank multiplied only its input columns; the layer's output is the sum of the parts
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class ColumnParallelLinear(nn.Linear):
    """This rank's output rows of a linear (weight and bias both sharded)."""

    tensor_parallel_sharded = ("weight", "bias")

    def __init__(self, in_features: int, out_features: int, bias: bool, group: dist.ProcessGroup):
        super().__init__(in_features, out_features, bias=bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_CopyToTensorParallel.apply(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    """This rank's input columns of a linear; the (whole) bias is added after the sum."""

    tensor_parallel_sharded = ("weight",)

    def __init__(self, in_features: int, out_features: int, bias: bool, group: dist.ProcessGroup):
        super().__init__(in_features, out_features, bias=bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _ReduceFromTensorParallel.apply(F.linear(x, self.weight), self.group)
        return out if self.bias is None else out + self.bias


def check_tensor_parallel(arch: Arch, tensor_parallel: int) -> None:
    """Refuse a layout whose heads, KV heads or MLP width do not split evenly, before any weight moves."""
    try:
        check_divisible(arch, tensor_parallel)
        plan_layer(arch, name_map(arch))
    except TensorParallelError as err:
        raise TensorParallelError(f"spec.parallelism.tensorParallel: {err}") from None


def parallelize(module: nn.Module, group: dist.ProcessGroup) -> int:
    """Swap every decoder layer's four linears in ``module`` (built from ``local_arch``) for their
    tensor-parallel forms, on whatever device they are (the meta device before loading). Returns how
    many were swapped."""
    kinds: dict[str, type[ColumnParallelLinear] | type[RowParallelLinear]] = {
        **dict.fromkeys(COLUMN_PARALLEL, ColumnParallelLinear),
        **dict.fromkeys(ROW_PARALLEL, RowParallelLinear),
    }
    swaps = []
    for name, child in module.named_modules():
        kind = next((k for suffix, k in kinds.items() if name == suffix or name.endswith("." + suffix)), None)
        if kind is not None and type(child) is nn.Linear:
            parent_name, _, attr = name.rpartition(".")
            swaps.append((module.get_submodule(parent_name), attr, child, kind))
    for parent, attr, old, kind in swaps:
        with torch.device(old.weight.device):
            new = kind(old.in_features, old.out_features, old.bias is not None, group)
        setattr(parent, attr, new.to(old.weight.dtype))
    return len(swaps)


def mark_layouts(module: PipelineModule, roles: list[Role], arch: Arch) -> int:
    """Name on each decoder layer's four linears in ``module`` (parallel or plain) how tensor parallelism
    splits their parameters, with the whole model's ``arch``: the fused ``wqkv`` as q | k | v rows by
    heads and KV heads, a gated ``w_in`` as gate | up rows, the row-parallel weights by input columns (their
    bias is whole); and on the token embedding and LM head, vocabulary rows (vocab_parallel.py). The
    inverse of ``unshard_block``'s joining, for any two sizes. Returns how many modules."""
    from conveyor.train.hf_layers import layer_module  # hf_layers imports this module

    marked = 0
    for index in range(module.start, module.stop):
        if roles[index].kind in ("embed", "head"):
            setattr(layer_module(module, roles, index), LAYOUT_ATTR, {"weight": ShardLayout(0)})
            marked += 1
    qkv = ShardLayout(0, (arch.heads, arch.kv_heads, arch.kv_heads))
    layouts = {
        "attn.wqkv": {"weight": qkv, "bias": qkv},
        "mlp.w_in": dict.fromkeys(("weight", "bias"), ShardLayout(0, (1, 1) if arch.gated_mlp else (1,))),
        "attn.wo": {"weight": ShardLayout(1)},
        "mlp.w_out": {"weight": ShardLayout(1)},
    }
    for name, child in module.named_modules():
        layout = next((v for suffix, v in layouts.items() if name.endswith("." + suffix)), None)
        if layout is not None and isinstance(child, nn.Linear):
            setattr(child, LAYOUT_ATTR, layout)
            marked += 1
    return marked


def replicated_gradient_gaps(module: nn.Module, group: dist.ProcessGroup) -> dict[str, float]:
    """Each replicated parameter's largest gradient difference from tensor rank 0's (collective over the
    tensor group); sharded parameters are skipped. Empty when every replicated gradient agrees."""
    sharded = {id(p) for p in sharded_parameters(module).values()}
    gaps: dict[str, float] = {}
    src = dist.get_global_rank(group, 0)
    for name, p in module.named_parameters():  # the same order on every tensor rank
        if id(p) in sharded:
            continue
        grad = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
        first = grad.clone()
        dist.broadcast(first, src=src, group=group)  # why: compare against one rank's copy
        gap = float((grad - first).abs().max())
        if gap > 0:
            gaps[name] = gap
    return gaps


def unshard_block(parts: list[dict[str, torch.Tensor]], arch: Arch) -> dict[str, torch.Tensor]:
    """One decoder layer's whole parameters (``attn.wqkv.weight``, ...: our fused layout, full widths of
    ``arch``) from every tensor rank's ``parts``, in tensor-rank order: the inverse of the loader's
    ``Shard`` reading. Replicated parameters are taken from rank 0."""
    t = len(parts)
    if t == 1:
        return dict(parts[0])
    q_rows, kv_rows = arch.heads // t * arch.head_dim, arch.kv_heads // t * arch.head_dim
    out = dict(parts[0])
    for suffix in (".weight", ".bias"):
        name = "attn.wqkv" + suffix
        if name in out:  # each rank: its q heads | k heads | v heads
            pieces = [p[name].split([q_rows, kv_rows, kv_rows]) for p in parts]
            out[name] = torch.cat([torch.cat([piece[j] for piece in pieces]) for j in range(3)])
        name = "mlp.w_in" + suffix
        if name in out:  # each rank: its gate columns | its up columns (gated), or its up columns
            if arch.gated_mlp:
                pieces = [p[name].chunk(2) for p in parts]
                out[name] = torch.cat([torch.cat([piece[j] for piece in pieces]) for j in range(2)])
            else:
                out[name] = torch.cat([p[name] for p in parts])
    for name in ("attn.wo.weight", "mlp.w_out.weight"):  # row-parallel: input columns
        if name in out:
            out[name] = torch.cat([p[name] for p in parts], dim=1)
    return out


def gather_block(
    local: dict[str, torch.Tensor], arch: Arch, group: dist.ProcessGroup
) -> dict[str, torch.Tensor]:
    """This decoder layer's whole parameters, gathered from the tensor group (collective over it)."""
    size = dist.get_world_size(group)
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(size)]
    for name in sorted(local):  # the same order on every rank
        tensor = local[name].contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(gathered, tensor, group=group)  # why: each tensor rank holds a part of the layer
        for rank, part in enumerate(gathered):
            parts[rank][name] = part
    return unshard_block(parts, arch)
