"""``conveyor.init_inference``: DeepSpeed's inference call on a model the user already built.

    engine = conveyor.init_inference(model, tensor_parallel={"tp_size": 2}, dtype=torch.float16)
    engine.module.generate(...)            # or transformers.pipeline(..., model=engine.module)

Each process of the tensor-parallel group calls it on its own full copy of the model (as with
DeepSpeed); the dataflow is traced once, the plan is checked (a TP size that does not divide the heads
is refused before any weight moves), and each rank keeps its slices. ``.module`` stays the user's HF
model class, so HF ``generate`` and ``pipeline`` work unchanged.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import PretrainedConfig

from conveyor.autotp.plan import AutoTPError, Plan, hf_plan_mismatches, make_plan
from conveyor.autotp.shard import shard_model
from conveyor.autotp.trace import LinearFlow, Tracer

log = logging.getLogger(__name__)


def _tp_size(tensor_parallel: Any, mp_size: int | None) -> int:
    if tensor_parallel is None:
        return mp_size or 1
    if isinstance(tensor_parallel, int):
        return tensor_parallel
    if isinstance(tensor_parallel, Mapping):
        unknown = set(tensor_parallel) - {"tp_size", "enabled"}
        if unknown:
            raise AutoTPError(
                f"tensor_parallel has unknown keys {sorted(unknown)}; it takes {{'tp_size': N}}"
            )
        return int(tensor_parallel.get("tp_size", 1))
    return int(tensor_parallel.tp_size)


def _trace_inputs(model: Any) -> dict[str, torch.Tensor]:
    config = model.config
    device = next(model.parameters()).device
    ids = (torch.arange(1, 9, device=device) % max(config.vocab_size - 1, 1) + 1).unsqueeze(0)  # [1, 8]
    accepted = inspect.signature(model.forward).parameters
    inputs = {"input_ids": ids}
    if "attention_mask" in accepted:
        inputs["attention_mask"] = torch.ones_like(ids)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in accepted:
        inputs["decoder_input_ids"] = ids[:, :4]
    if "use_cache" in accepted:
        inputs["use_cache"] = False  # type: ignore[assignment]
    return inputs


def trace_flows(model: Any) -> dict[str, LinearFlow]:
    """Trace which linear feeds which (the LM head left out: it is planned with the embeddings)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {n for n, m in model.named_modules() if m is out and out is not None}
    model.eval()
    return Tracer(model, skip).run(_trace_inputs(model))


def plan_model(model: Any, tp: int) -> Plan:
    """The tensor-parallel plan of ``model`` for ``tp`` ranks; raises ``AutoTPError`` naming the layers
    ``tp`` does not divide (and the TP sizes that would work)."""
    flows = trace_flows(model)
    try:
        plan = make_plan(model, flows, tp)
    except AutoTPError as err:
        works = []
        for t in (1, 2, 4, 8):
            try:
                make_plan(model, flows, t)
                works.append(t)
            except AutoTPError:
                pass
        raise AutoTPError(f"{err}. Tensor-parallel sizes that divide this model: {works}") from None
    for mismatch in hf_plan_mismatches(model, plan):
        log.warning("autotp: %s", mismatch)
    return plan


class InferenceEngine:
    """What ``init_inference`` returns: ``.module`` is the (sharded) HF model."""

    def __init__(self, module: Any, plan: Plan, rank: int, max_out_tokens: int):
        self.module = module
        self.plan = plan
        self.rank = rank
        self.max_out_tokens = max_out_tokens

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    forward = __call__

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        new = kwargs.get("max_new_tokens", 0)
        if isinstance(ids, torch.Tensor) and ids.shape[-1] + new > self.max_out_tokens:
            raise ValueError(
                f"prompt ({ids.shape[-1]} tokens) + max_new_tokens ({new}) exceeds max_out_tokens "
                f"({self.max_out_tokens}); raise max_out_tokens in init_inference"
            )
        return self.module.generate(*args, **kwargs)


def _tp_group(tp: int) -> tuple[int, Any]:
    """This process's rank within its TP group and the group (consecutive ranks of the world)."""
    if tp == 1:
        return 0, None
    if not dist.is_initialized():
        raise AutoTPError(
            f"tensor_parallel tp_size={tp} needs torch.distributed initialised on {tp} processes "
            "(conveyor.init_distributed() or torchrun)"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp:
        raise AutoTPError(f"tensor_parallel tp_size={tp} does not divide the world size {world}")
    mine = None
    for start in range(0, world, tp):  # every rank creates every group (new_group is collective)
        group = dist.new_group(list(range(start, start + tp)))
        if start <= rank < start + tp:
            mine = group
    return rank % tp, mine


def init_inference(
    model: nn.Module,
    tensor_parallel: Any = None,
    dtype: torch.dtype | None = None,
    injection_policy: Mapping[Any, Any] | None = None,
    replace_with_kernel_inject: bool = False,
    max_out_tokens: int = 1024,
    mp_size: int | None = None,
    **ignored: Any,
) -> Any:
    """Split ``model`` over ``tensor_parallel['tp_size']`` processes; see the module docstring."""
    tp = _tp_size(tensor_parallel, mp_size)
    if tp < 1:
        raise AutoTPError(f"tensor_parallel tp_size must be >= 1, got {tp}")
    if ignored:
        log.info("autotp: ignoring DeepSpeed options %s", sorted(ignored))
    if replace_with_kernel_inject:
        raise AutoTPError(
            "replace_with_kernel_inject=True is not supported yet by conveyor.init_inference; "
            "pass replace_with_kernel_inject=False (automatic tensor parallelism on the HF modules)"
        )
    if injection_policy:
        raise AutoTPError(
            "injection_policy is not supported: conveyor.init_inference detects the row-parallel layers "
            "from the model's dataflow; leave injection_policy=None"
        )
    if not isinstance(getattr(model, "config", None), PretrainedConfig):
        raise AutoTPError(
            f"init_inference takes a transformers PreTrainedModel (with .config); got {type(model).__name__}"
        )
    plan = plan_model(model, tp)  # refused here, before a process group is touched or a weight moves
    rank, group = _tp_group(tp)
    log.info("autotp: %s", plan.describe())
    shard_model(model, plan, rank, group)
    if dtype is not None:
        model.to(dtype)
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        model.to(torch.device("cuda", torch.cuda.current_device()))
    return InferenceEngine(model, plan, rank, max_out_tokens)
