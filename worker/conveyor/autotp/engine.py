"""``conveyor.init_inference``: DeepSpeed's inference call on a model the user already built.

    engine = conveyor.init_inference(model, tensor_parallel={"tp_size": 2}, dtype=torch.float16)
    engine.module.generate(...)            # or transformers.pipeline(..., model=engine.module)

Each process of the tensor-parallel group calls it on its own copy of the model (as with DeepSpeed):
a full one, or one built on the meta device plus ``checkpoint=`` (checkpoint.py: each rank reads only
its slices). The dataflow is traced once, the plan is checked (a TP size that does not divide the heads
is refused before any weight moves), and each rank keeps its slices. A whole model's split is then run
once on the trace's input and refused if it computes something else (split_check.py). ``.module`` stays the user's HF
model class, so HF ``generate`` and ``pipeline`` work unchanged; with ``replace_with_kernel_inject=True``
a family our compact decoder covers gets that instead (kernel_inject.py), others stay on this path.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import PretrainedConfig

from conveyor.autotp.checkpoint import LoadReport, checkpoint_files, load_sharded_checkpoint
from conveyor.autotp.fast_module import FastCausalLM
from conveyor.autotp.kernel_inject import build_fast_module, check_kernel_inject, kernel_inject_unavailable
from conveyor.autotp.plan import AutoTPError, Plan, hf_plan_mismatches, make_plan
from conveyor.autotp.shard import shard_model
from conveyor.autotp.split_check import check_split
from conveyor.autotp.trace import Tracer, is_experts

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


# DeepSpeed's inference config takes a dtype or these names (its DtypeEnum); int8 (its quantized kernels)
# has no counterpart here
DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype(dtype: Any) -> torch.dtype | None:
    """``dtype`` as a torch dtype, refused by name unless a float one: checked before any weight moves (a
    wrong one used to fail in ``model.to``, on the AutoTP path after the model was sharded in place)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        resolved = DTYPE_NAMES.get(dtype.removeprefix("torch."))
        if resolved is not None:
            return resolved
    elif dtype in DTYPES:
        return dtype  # type: ignore[no-any-return]
    raise AutoTPError(
        f"dtype={dtype!r} is not supported: init_inference takes torch.float32, torch.float16 or "
        f"torch.bfloat16 (or one of {sorted(DTYPE_NAMES)}); int8 quantization is not available"
    )


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


def _stream_width(model: Any) -> int | None:
    """The residual stream's width (``hidden_size``; GPT-2's ``n_embd`` and T5's ``d_model`` map to it)."""
    width = getattr(model.config, "hidden_size", None)
    return width if isinstance(width, int) else None


def on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def trace_model(model: Any) -> Tracer:
    """Trace which linear feeds which (the LM head left out: it is planned with the embeddings). The
    tracer holds the flows, the forward's logits (the whole model's answer to the probe input; None on
    the meta device) and whether the LM head was called."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {n for n, m in model.named_modules() if m is out and out is not None}
    model.eval()
    tracer = Tracer(model, skip, _stream_width(model))
    if not on_meta(model):
        tracer.run(_trace_inputs(model))
        return tracer
    # A model built on the meta device has no values to branch on (HF's mask helpers ask whether any
    # token is padded); under fake tensors transformers takes its tracing path, and the autograd graph
    # (all the tracer reads) is the same.
    from torch._subclasses.fake_tensor import FakeTensorMode

    experts_impl = _trace_experts_with_batched_mm(model)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            tracer.run(_trace_inputs(model))
        return tracer
    except Exception as err:
        raise AutoTPError(
            f"tracing {type(model).__name__} on the meta device failed ({type(err).__name__}: "
            f"{str(err)[:200]}); build the model on the CPU instead, or without checkpoint="
        ) from err
    finally:
        if experts_impl is not None:
            model.set_experts_implementation(experts_impl)


def _trace_experts_with_batched_mm(model: Any) -> str | None:
    """Switch a MoE model's experts to transformers' ``batched_mm`` for the fake-tensor trace and return
    the implementation to restore. Why: the default ``grouped_mm`` checks on the meta device for bf16
    only, and ``eager`` loops over the experts a token hit (a data-dependent shape); ``batched_mm``
    gathers each token's expert weights, so the fake trace has static shapes. The experts module is
    traced as one linear, so the dataflow around it is the same."""
    current = getattr(model.config, "_experts_implementation", None)
    if current in (None, "batched_mm") or not callable(getattr(model, "set_experts_implementation", None)):
        return None
    if not any(is_experts(m) for m in model.modules()):
        return None
    model.set_experts_implementation("batched_mm")
    return str(current)


def plan_model(model: Any, tp: int) -> Plan:
    """The tensor-parallel plan of ``model`` for ``tp`` ranks; raises ``AutoTPError`` naming the layers
    ``tp`` does not divide (and the TP sizes that would work)."""
    return _plan_and_reference(model, tp)[0]


def _plan_and_reference(model: Any, tp: int) -> tuple[Plan, torch.Tensor | None]:
    """``plan_model``'s plan and the traced forward's logits (split_check.py's reference)."""
    tracer = trace_model(model)
    flows, head_called = tracer.flows, bool(tracer.skipped_called)
    try:
        plan = make_plan(model, flows, tp, lm_head_called=head_called)
    except AutoTPError as err:
        works = []
        for t in (1, 2, 4, 8):
            try:
                make_plan(model, flows, t, lm_head_called=head_called)
                works.append(t)
            except AutoTPError:
                pass
        raise AutoTPError(f"{err}. Tensor-parallel sizes that divide this model: {works}") from None
    for mismatch in hf_plan_mismatches(model, plan):
        log.warning("autotp: %s", mismatch)
    return plan, tracer.output


class InferenceEngine:
    """What ``init_inference`` returns: ``.module`` is the (sharded) HF model, or under kernel inject our
    fast decoder with HF's call shapes (fast_module.py). ``plan`` is None on the fast path; ``load_report``
    what this rank read from ``checkpoint=`` (None without one); ``split_error`` how far the split model's
    logits were from the whole model's on the probe input (split_check.py; None where not checked)."""

    def __init__(
        self,
        module: Any,
        plan: Plan | None,
        rank: int,
        max_out_tokens: int,
        load_report: LoadReport | None = None,
        split_error: float | None = None,
    ):
        self.module = module
        self.plan = plan
        self.rank = rank
        self.max_out_tokens = max_out_tokens
        self.load_report = load_report
        self.split_error = split_error

    @property
    def kernel_injected(self) -> bool:
        return isinstance(self.module, FastCausalLM)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    forward = __call__

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        new = kwargs.get("max_new_tokens") or 0  # None, as HF takes it: the generation config's
        if isinstance(ids, torch.Tensor) and ids.shape[-1] + new > self.max_out_tokens:
            raise ValueError(
                f"prompt ({ids.shape[-1]} tokens) + max_new_tokens ({new}) exceeds max_out_tokens "
                f"({self.max_out_tokens}); raise max_out_tokens in init_inference"
            )
        return self.module.generate(*args, **kwargs)


# set on a model init_inference has split (its TP size): a second call on it is refused
SPLIT_MARK = "_conveyor_tp_size"


def _mark_split(model: nn.Module, tp: int) -> None:
    object.__setattr__(model, SPLIT_MARK, tp)  # a plain attribute, not a buffer or submodule


def _tp_group(tp: int) -> tuple[int, Any, int]:
    """This process's rank within its TP group, the group (consecutive ranks of the world) and the
    global rank of the group's rank 0."""
    if tp == 1:
        return 0, None, dist.get_rank() if dist.is_initialized() else 0
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
    return rank % tp, mine, rank - rank % tp


def _device(group: Any, requested: str | torch.device | None = None) -> torch.device:
    """``requested``, else the current GPU (as DeepSpeed's init_inference), unless the ranks talk over gloo
    (the CPU). Ranks sharing one GPU over gloo (NCCL refuses two ranks on one device) pass ``device``."""
    if requested is not None:
        return torch.device(requested)
    if torch.cuda.is_available() and (not dist.is_initialized() or dist.get_backend(group) == "nccl"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_inference(
    model: nn.Module,
    tensor_parallel: Any = None,
    dtype: torch.dtype | None = None,
    injection_policy: Mapping[Any, Any] | None = None,
    replace_with_kernel_inject: bool = False,
    max_out_tokens: int = 1024,
    mp_size: int | None = None,
    checkpoint: str | Path | Sequence[str | Path] | None = None,
    device: str | torch.device | None = None,
    verify_split: bool = True,
    **ignored: Any,
) -> Any:
    """Split ``model`` over ``tensor_parallel['tp_size']`` processes; see the module docstring.
    ``device`` (not a DeepSpeed option) overrides where the shards go: by default the current GPU under
    NCCL, the CPU under gloo. ``verify_split`` (not a DeepSpeed option either): compare the split model's
    logits on a probe input with the whole model's and refuse a split that computes something else
    (split_check.py); only where the whole model was given (not on the meta device)."""
    tp = _tp_size(tensor_parallel, mp_size)
    dtype = _dtype(dtype)
    if tp < 1:
        raise AutoTPError(f"tensor_parallel tp_size must be >= 1, got {tp}")
    if ignored:
        log.info("autotp: ignoring DeepSpeed options", extra={"options": sorted(ignored)})
    if injection_policy:
        raise AutoTPError(
            "injection_policy is not supported: conveyor.init_inference detects the row-parallel layers "
            "from the model's dataflow; leave injection_policy=None"
        )
    if not isinstance(getattr(model, "config", None), PretrainedConfig):
        raise AutoTPError(
            f"init_inference takes a transformers PreTrainedModel (with .config); got {type(model).__name__}"
        )
    done = getattr(model, SPLIT_MARK, None)
    if done is not None:  # its weights are this rank's slices: splitting them again would be silently wrong
        raise AutoTPError(
            f"{type(model).__name__} was already passed to init_inference (tp_size {done}) and is split or "
            "released in place: use the engine that call returned, or pass a freshly built model"
        )
    files = checkpoint_files(checkpoint) if checkpoint is not None else None
    if on_meta(model) and files is None:
        raise AutoTPError(
            f"{type(model).__name__} has parameters on the meta device: pass checkpoint= (its HF directory "
            "or .safetensors files) so each rank reads its slices, or build the model with weights"
        )
    if replace_with_kernel_inject:
        unavailable = kernel_inject_unavailable(model)
        if unavailable is None:
            check_kernel_inject(model, tp)  # refused here, before a process group or a weight
            rank, group, src = _tp_group(tp)
            module = build_fast_module(
                model,
                tp=tp,
                rank=rank,
                group=group,
                tensor_src=src,
                dtype=dtype,
                device=_device(group, device),
                max_out_tokens=max_out_tokens,
                files=files,
            )
            log.info(
                "autotp: kernel inject: our fast decode path",
                extra={
                    "model_type": getattr(model.config, "model_type", None),
                    "tp_size": tp,
                    "tp_rank": rank,
                },
            )
            _mark_split(model, tp)
            _mark_split(module, tp)
            return InferenceEngine(module, None, rank, max_out_tokens)
        log.info(
            "autotp: kernel inject not available for this family; automatic tensor parallelism on the HF modules",
            extra={"model_type": getattr(model.config, "model_type", None), "reason": unavailable},
        )
    plan, reference = _plan_and_reference(model, tp)  # refused here, before a process group or a weight
    reference_dtype = next(model.parameters()).dtype
    rank, group, _ = _tp_group(tp)
    log.info("autotp: %s", plan.describe())
    ledger = shard_model(model, plan, rank, group)
    if tp > 1:  # (at TP 1 the model stays whole)
        _mark_split(model, tp)
    target = _device(group, device)
    report = None
    if files is not None:
        report = load_sharded_checkpoint(model, ledger, files, dtype=dtype, device=target)
        log.info(
            "autotp: loaded this rank's slices of the checkpoint",
            extra={"param_bytes": report.param_bytes, "peak_bytes": report.peak_bytes, "files": len(files)},
        )
    if dtype is not None:
        model.to(dtype)
    if target.type == "cuda":
        model.to(target)
    error = None
    if verify_split and tp > 1 and reference is not None:
        error = check_split(
            model, _trace_inputs(model), reference, group, reference_dtype=reference_dtype, tp=tp
        )
        log.info("autotp: the split model matches the whole model on a probe input", extra={"error": error})
    return InferenceEngine(model, plan, rank, max_out_tokens, report, error)
