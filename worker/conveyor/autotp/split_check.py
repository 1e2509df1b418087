"""A split that computes something else than the whole model is refused, not served.

Detection reads the dataflow, and layouts.py lists what it cannot see; a family nobody listed can still
be split in a way that runs and is wrong (DBRX's, ModernBERT's and DiffLlama's fused or paired heads
gave logits 100%+ off, no error, until each was listed). So ``init_inference`` runs the split model once
on the probe input the trace used and compares with the whole model's answer, which the trace's own
forward already computed: the reference costs nothing and the unsplit model never has to live on the
rank's device; the check is one forward of the rank's shard on a few tokens.

Tolerance: each position's logits' relative L2 error, the median over positions (split_error). Float32
partial sums added in another order stay near 1e-6, so float32 is held to 1e-3 and a subtle mis-split
(a few heads' parameters misplaced) is caught. In bfloat16 two computations of one model differ by
rounding alone: about 0.01 for the tiny test families, 0.27 for the tiny T5 whose weights are 4x HF's
init (its bfloat16 whole model against its float32 one, no split involved). A mis-split is wrong at every
position by about its own norm (ModernBERT's fused q|k|v split as plain columns: 1.08; two unrelated
outputs: 1.4), so half precision is held to 0.5: a split wrong everywhere is always caught, a subtle one
only in float32.
Models built on the meta device (``checkpoint=``) have no whole-model answer and are not checked.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from conveyor.autotp.plan import AutoTPError
from conveyor.autotp.trace import main_output

# relative L2 error of the logits above which a split is refused, by the coarser of the dtypes the
# reference and the split model ran in
TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.5, torch.bfloat16: 0.5}


def split_error(split: torch.Tensor, reference: torch.Tensor) -> float:
    """The median over positions of ||split - reference|| / ||reference|| (each position's logits), in
    float32. The median: a mis-split is wrong at every position, while rounding can move a few tokens a
    long way (a MoE router's near-tie going to another expert) and leave the rest close."""
    ref = reference.float().reshape(-1, reference.shape[-1])  # [positions, vocab]
    diff = split.detach().float().to(ref.device).reshape(ref.shape) - ref
    per_position = diff.norm(dim=-1) / ref.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    return float(per_position.median())


def check_split(
    model: Any,
    inputs: dict[str, torch.Tensor],
    reference: torch.Tensor,
    group: Any,
    *,
    reference_dtype: torch.dtype,
    tp: int,
) -> float:
    """Run the split ``model`` on ``inputs`` and compare with the whole model's ``reference``; returns
    the error, or raises ``AutoTPError`` naming the family and the ways out. Every rank of ``group``
    calls it (the split forward has collectives) and every rank gets the same verdict."""
    family = f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r})"
    dtype = next(model.parameters()).dtype
    try:
        with torch.no_grad():
            out = main_output(model(**inputs))
    except Exception as err:
        raise AutoTPError(
            f"{family} split over tensor-parallel size {tp} fails its first forward "
            f"({type(err).__name__}: {str(err)[:300]}): this family's layout is not one automatic tensor "
            "parallelism knows; run it with tensor_parallel tp_size 1, or add its layout to "
            "conveyor/autotp/layouts.py"
        ) from err
    if out is None or out.shape != reference.shape:
        got = None if out is None else list(out.shape)
        raise AutoTPError(
            f"{family} split over tensor-parallel size {tp} answers the probe input with shape {got}, the "
            f"whole model with {list(reference.shape)}: run it with tensor_parallel tp_size 1, or add its "
            "layout to conveyor/autotp/layouts.py"
        )
    error = torch.tensor([split_error(out, reference)], dtype=torch.float64, device=out.device)
    if group is not None:
        # why: a rank whose whole model differed (weights not seeded alike) must refuse with the others,
        # not leave them waiting in the next collective
        dist.all_reduce(error, op=dist.ReduceOp.MAX, group=group)
    worst = float(error.item())
    coarser = max(TOLERANCE.get(reference_dtype, 0.5), TOLERANCE.get(dtype, 0.5))
    if not worst <= coarser:  # NaN too
        agree = float((out.float().argmax(-1).cpu() == reference.float().argmax(-1).cpu()).float().mean())
        raise AutoTPError(
            f"{family} split over tensor-parallel size {tp} computes something else than the whole model: on "
            f"a probe input its logits differ by {worst:.3g} of their norm (rounding in {dtype} stays "
            f"under {coarser:g}) and {agree:.0%} of its top-1 tokens agree. Its layout (fused or paired "
            "heads, per-head parameters, head counts read from the config) is one automatic tensor "
            "parallelism does not know: run it with tensor_parallel tp_size 1, or add its layout to "
            "conveyor/autotp/layouts.py. If every rank was not given the same weights (a model built "
            "with random weights and no common seed), that is the cause instead. verify_split=False "
            "skips this check"
        )
    return worst
