"""``replace_with_kernel_inject=True``: build our compact decoder for the user's model, sharded by TP.

For a family our StageModel covers (llama, mistral, qwen2, gpt_neox, opt, gpt2: families.py), each rank
reads its slices of the HF module's own tensors (``state_dict()``: views, nothing written to disk) or,
for a model built on the meta device, of the ``checkpoint=`` files (``get_slice``), through the same
loader the inference jobs use (names and shapes checked against the config first). The HF module's
weights are released (moved to the meta device) layer by layer as the stage model is filled, as DeepSpeed's
injection consumes the model it is given: a rank holds about one copy of the model while building, the
HF model shrinking as its shard grows, and only its shard once the call returns. Other families keep AutoTP's HF-module path (``kernel_inject_unavailable`` says why).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from conveyor.autotp.fast_module import FastCausalLM
from conveyor.autotp.plan import AutoTPError
from conveyor.inference.model.families import CAUSAL_FAMILIES, UnsupportedModelError, arch_from_config
from conveyor.inference.model.loader import Checkpoint, Shard, StateDictTensors, load_stage
from conveyor.inference.pipeline.tensor_parallel import (
    TensorParallelError,
    add_all_reduce_hooks,
    check_divisible,
)


def kernel_inject_unavailable(model: Any) -> str | None:
    """Why ``model`` has no fast decode path (None: it has one)."""
    family = getattr(model.config, "model_type", None)
    if family not in CAUSAL_FAMILIES:
        return f"model_type {family!r} has no fast decode path (it has: {', '.join(CAUSAL_FAMILIES)})"
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        return f"{type(model).__name__} has no LM head (the fast path serves *ForCausalLM models)"
    try:
        arch_from_config(model.config)
    except UnsupportedModelError as err:
        return str(err)
    return None


def check_kernel_inject(model: Any, tp: int) -> None:
    """Refuse a TP size the heads or MLP do not divide, before any process group or weight is touched."""
    try:
        check_divisible(arch_from_config(model.config), tp)
    except TensorParallelError as err:
        raise AutoTPError(str(err)) from None


def build_fast_module(
    model: nn.Module,
    *,
    tp: int,
    rank: int,
    group: Any,
    tensor_src: int,
    dtype: torch.dtype | None,
    device: torch.device,
    max_out_tokens: int,
    files: list[Path] | None,
) -> FastCausalLM:
    """This rank's shard of ``model`` as our StageModel (all layers, one pipeline stage)."""
    config: Any = model.config
    arch = arch_from_config(config)
    param_dtype = next(model.parameters()).dtype  # not the parameter: holding it would keep its storage
    if files is not None:
        source: Checkpoint = Checkpoint(files[0].parent, files)
    else:
        source = StateDictTensors(
            model.state_dict(),
            label=f"{type(model).__name__}.state_dict()",
            on_release=lambda prefix: _release(model, prefix),
        )
    stage = load_stage(source, arch, shard=Shard(rank, tp), dtype=dtype or param_dtype, device=device)
    del source  # its state_dict views of what is left (embeddings, final norm, LM head)
    if tp > 1:
        add_all_reduce_hooks(stage, group)
    model.to("meta")  # its weights now live in the stage model (this rank's slices of them)
    return FastCausalLM(
        stage,
        config,
        getattr(model, "generation_config", None),
        max_out_tokens=max_out_tokens,
        tensor_group=group,
        tensor_src=tensor_src,
        rank=rank,
    )


def _release(model: nn.Module, prefix: str) -> None:
    """Free the HF module's layer under ``prefix`` once its slices are in the stage model, so a rank holds
    about one copy of the model while building, not the HF model plus its shard. Its storage is freed
    only if nothing else shares it: a ``state_dict()`` or ``.detach()`` the caller still holds keeps it."""
    try:
        layer = model.get_submodule(prefix.removesuffix("."))
    except AttributeError:  # state_dict names that are not module paths: freed at the end instead
        return
    layer.to("meta")
