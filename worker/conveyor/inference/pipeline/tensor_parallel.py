"""Automatic tensor parallelism (Megatron style) for the supported families.

Detection: in every layer, the linears that *end* a block (attention output, MLP down) are row-parallel
(their input dimension is split, one all-reduce sums the partial outputs); every other linear (q, k, v,
fused qkv, gate, up) is column-parallel (its output dimension is split by heads or evenly). An explicit
policy ``{layer class: (row-parallel linear names)}``, as DeepSpeed's ``injection_policy``, replaces the
detection for that layer class; every linear it does not name is column-parallel. A plan that would
leave a block's output sharded (or split a block's input the wrong way) is refused with the names.

The only collective of the forward pass is here: ``add_all_reduce_hooks`` puts one all-reduce after
each row-parallel module of a built model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from conveyor.distributed import held_weakly
from conveyor.inference.model.checkpoint_layout import (  # noqa: F401 (re-exported: they were defined here)
    TensorParallelError,
    check_divisible,
)
from conveyor.inference.model.families import Arch, LinearKind, NameMap

Role = Literal["column", "row"]
Policy = Mapping[str | type, Sequence[str]]

# HF linear names (suffixes inside a layer) known to end a block, across the supported families.
ROW_PARALLEL_NAMES = (
    "self_attn.o_proj",
    "self_attn.out_proj",
    "attention.dense",
    "attention.output.dense",
    "attn.c_proj",
    "mlp.down_proj",
    "mlp.dense_4h_to_h",
    "mlp.c_proj",
    "fc2",
    "output.dense",
)
_ROW_KINDS: frozenset[LinearKind] = frozenset({"o", "down"})


def _policy_rows(arch: Arch, policy: Policy | None) -> set[str] | None:
    if not policy:
        return None
    by_name = {(k if isinstance(k, str) else k.__name__): tuple(v) for k, v in policy.items()}
    if arch.layer_class not in by_name:
        raise TensorParallelError(
            f"the tensor-parallel policy names {sorted(by_name)} but this {arch.family} model's layers are "
            f"{arch.layer_class}: key the policy by {arch.layer_class!r}"
        )
    return set(by_name[arch.layer_class])


def plan_layer(arch: Arch, names: NameMap, policy: Policy | None = None) -> dict[str, Role]:
    """Each HF linear of a layer (relative name) -> column or row parallel."""
    linear_names = [lin.name for lin in names.linears]
    rows = _policy_rows(arch, policy)
    if rows is None:
        rows = {n for n in linear_names if any(n == s or n.endswith("." + s) for s in ROW_PARALLEL_NAMES)}
    unknown = rows - set(linear_names)
    if unknown:
        raise TensorParallelError(
            f"tensor-parallel policy for {arch.layer_class} names {sorted(unknown)}, which are not linears of "
            f"that layer; its linears are {linear_names}"
        )
    plan: dict[str, Role] = {n: ("row" if n in rows else "column") for n in linear_names}
    for lin in names.linears:
        needed: Role = "row" if lin.kind in _ROW_KINDS else "column"
        if plan[lin.name] != needed:
            why = (
                "it ends a block: as column-parallel its output would stay split across ranks"
                if needed == "row"
                else "it reads the block's full input: as row-parallel it would need a split input"
            )
            raise TensorParallelError(
                f"{arch.layer_class}.{lin.name} must be {needed}-parallel ({why}); "
                f"{'add it to' if needed == 'row' else 'remove it from'} the policy's row-parallel names"
            )
    return plan


def shard_range(total: int, tensor_parallel: int, rank: int) -> tuple[int, int]:
    size = total // tensor_parallel
    return rank * size, (rank + 1) * size


def add_all_reduce_hooks(model: nn.Module, group: dist.ProcessGroup | None) -> int:
    """Sum the partial outputs of every row-parallel module (attention ``wo``, MLP ``w_out``) over the
    tensor-parallel group. Returns how many hooks were added."""
    tensor_group = held_weakly(group)  # a user's model can outlive the group (conveyor.init_inference)

    def all_reduce(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        # why: a row-parallel linear yields a partial sum on each rank; the block's output is their sum.
        dist.all_reduce(output, group=tensor_group())
        return output

    count = 0
    for name, module in model.named_modules():
        if name.endswith("attn.wo") or name.endswith("mlp.w_out"):
            module.register_forward_hook(all_reduce)
            count += 1
    return count
