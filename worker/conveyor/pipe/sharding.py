"""Which parameters are tensor-parallel shards, as the engine sees them.

A module whose parameters are a shard of a bigger tensor (train/tensor_parallel.py's parallel linears)
names them in a ``tensor_parallel_sharded`` class attribute. The engine needs to know twice: the
gradient norm sums a shard's squares over the tensor group (a replicated parameter counts once), and a
checkpoint keys a shard by its tensor rank (``@tp0of2``): the ranks of a tensor group hold different
tensors under one parameter name, which DCP would otherwise take for one replicated entry.

How a parameter is split (``ShardLayout``) is named apart, in ``tensor_parallel_layout``, on the modules
tensor parallelism splits or would split: a plain (unsplit) model names it too, so that a checkpoint saved
with one tensorParallel can be cut for another (pipe/reshard.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

SHARDED_ATTR = "tensor_parallel_sharded"
LAYOUT_ATTR = "tensor_parallel_layout"


@dataclass(frozen=True)
class ShardLayout:
    """How tensor parallelism splits a parameter: along ``dim``, the whole tensor is consecutive
    ``segments`` (relative sizes: a fused q | k | v by heads and KV heads, gate | up), each split evenly
    over the tensor ranks; a rank's shard is its part of every segment, concatenated in order."""

    dim: int
    segments: tuple[int, ...] = (1,)


_KEY = re.compile(r"(.+)@tp(\d+)of(\d+)")


def sharded_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Parameter name (as ``module.named_parameters`` spells it) -> parameter, for every shard."""
    out: dict[str, nn.Parameter] = {}
    for prefix, child in module.named_modules():
        for attr in getattr(child, SHARDED_ATTR, ()):
            param = getattr(child, attr, None)
            if isinstance(param, nn.Parameter):
                out[f"{prefix}.{attr}" if prefix else attr] = param
    return out


def shard_layouts(module: nn.Module) -> dict[str, ShardLayout]:
    """Parameter name -> its ``ShardLayout``, for every parameter whose module names one (split now or not)."""
    out: dict[str, ShardLayout] = {}
    for prefix, child in module.named_modules():
        for attr, layout in getattr(child, LAYOUT_ATTR, {}).items():
            if isinstance(getattr(child, attr, None), nn.Parameter):
                out[f"{prefix}.{attr}" if prefix else attr] = layout
    return out


def shard_key(name: str, tp_rank: int, tensor_parallel: int) -> str:
    """The checkpoint key of tensor rank ``tp_rank``'s shard of parameter ``name``."""
    return f"{name}@tp{tp_rank}of{tensor_parallel}"


def split_shard_key(key: str) -> tuple[str, int, int] | None:
    """(name, tp_rank, tensor_parallel) of a shard's key; None for a replicated entry."""
    found = _KEY.fullmatch(key)
    return None if found is None else (found[1], int(found[2]), int(found[3]))
