"""MoE experts: which dimension of which parameter each rank keeps, so that every expert's gate and up
projections are column-parallel and its down projection row-parallel, with one all-reduce after the
module's weighted sum of its experts (each rank's sum is a partial sum of every expert's output).

Two storages:

- 3D weights, the experts first, one per projection (transformers 5's ``@use_experts_implementation``
  modules, Llama 4's): [experts, out, in], or [experts, in, out] where the module says ``is_transposed``
  (GPT-OSS) or only that reading of the shapes fits (Llama 4: ``bmm(x, gate_up_proj)``), each with an
  optional bias [experts, out] named ``<weight>_bias``. A fused gate|up is two halves (``chunk(2,
  dim=-1)``), each split; or interleaved (``is_concatenated=False``, GPT-OSS's ``gate_up[..., ::2]`` and
  ``[..., 1::2]``), where one contiguous piece per rank holds whole (gate, up) pairs. A bias added after
  the down projection is kept on rank 0 alone: the all-reduce adds it once.
- 2D matrices of every expert's rows stacked, cut per expert in the forward (``layouts.STACKED_EXPERTS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from conveyor.autotp.layouts import STACKED_EXPERTS
from conveyor.autotp.split import Split

# Attributes of an experts module holding one expert's inner width: divided where they equal it (no
# forward of transformers 5.17 reads them, but a rank's module then describes what it holds)
EXPERT_WIDTH_ATTRS = ("intermediate_dim", "intermediate_size", "expert_dim", "ffn_hidden_size")


@dataclass
class ExpertsPlan:
    """``name``: the module whose output sums its experts (the all-reduce follows it)."""

    name: str
    slices: dict[str, tuple[int, Split]]  # parameter (dotted, under the module) -> (its dim, the split)
    once: list[str] = field(default_factory=list)  # biases after the down projection: rank 0 keeps them
    widths: dict[str, int] = field(default_factory=dict)  # attribute (dotted) -> one expert's inner width


def is_stacked_experts(module: nn.Module) -> bool:
    return type(module).__name__ in STACKED_EXPERTS


def _reading(
    shapes: dict[str, tuple[int, ...]], hidden: int, transposed: bool
) -> tuple[dict[str, int], int] | None:
    """Under ``transposed`` (shapes [experts, in, out]) or not ([experts, out, in]): the up projections
    with their output widths and the inner width (the down projections' input), if the shapes fit that
    reading: downs write ``hidden``, ups read it, and every up is one or two inner widths wide."""
    ups: dict[str, int] = {}
    inners = set()
    for name, shape in shapes.items():
        out, inp = (shape[2], shape[1]) if transposed else (shape[1], shape[2])
        if out == hidden and inp != hidden:
            inners.add(inp)
        elif inp == hidden and out != hidden:
            ups[name] = out
        else:
            return None
    if len(inners) != 1 or not ups:
        return None
    inner = inners.pop()
    return (ups, inner) if all(w in (inner, 2 * inner) for w in ups.values()) else None


def _fused_plan(name: str, module: nn.Module, hidden: int, tp: int) -> tuple[ExpertsPlan | None, list[str]]:
    params = dict(module.named_parameters(recurse=False))
    weights = {n: tuple(p.shape) for n, p in params.items() if p.dim() == 3}
    flag = getattr(module, "is_transposed", None)
    readings = [t for t in (False, True) if (flag is None or flag == t) and _reading(weights, hidden, t)]
    unknown = [n for n, p in params.items() if p.dim() != 3 and n.removesuffix("_bias") not in weights]
    if len(readings) != 1 or unknown:
        why = (
            f"parameters {unknown} that are neither weights nor their biases"
            if unknown
            else ("experts weights whose in/out widths do not show which is up and which down")
        )
        return None, [f"{name}: {why}"]
    transposed = readings[0]
    found = _reading(weights, hidden, transposed)
    assert found is not None
    ups, inner = found
    interleaved = getattr(module, "is_concatenated", True) is False
    slices: dict[str, tuple[int, Split]] = {}
    once = []
    for w in weights:
        bias = f"{w}_bias" if f"{w}_bias" in params else None
        if w in ups:
            fused = ups[w] == 2 * inner
            split = Split((inner, inner)) if fused and not interleaved else Split((ups[w],))
            slices[w] = (2 if transposed else 1, split)
            if bias:
                slices[bias] = (1, split)
        else:
            slices[w] = (1 if transposed else 2, Split((inner,)))
            if bias:
                once.append(bias)
    widths = {a: inner for a in EXPERT_WIDTH_ATTRS if getattr(module, a, None) == inner}
    problems = [f"{name}: {inner} channels per expert cannot be split {tp} ways"] if inner % tp else []
    return ExpertsPlan(name, slices, once, widths), problems


def _stacked_plan(name: str, module: nn.Module, tp: int) -> tuple[ExpertsPlan | None, list[str]]:
    child, weights, width_attr, count_attr = STACKED_EXPERTS[type(module).__name__]
    inner, experts = int(getattr(module, width_attr)), int(getattr(module, count_attr))
    holder = module.get_submodule(child)
    split = Split((inner,), experts)  # dim 0: experts x inner rows, each expert's cut alike
    slices = {f"{child}.{w}": (0, split) for w in weights}
    widths = {width_attr: inner}
    if getattr(holder, width_attr, None) == inner:
        widths[f"{child}.{width_attr}"] = inner
    problems = [f"{name}: {inner} channels per expert cannot be split {tp} ways"] if inner % tp else []
    bad = [w for w in weights if getattr(holder, w).shape[0] != experts * inner]
    problems += [f"{name}.{child}.{w}: not {experts} experts x {inner} rows" for w in bad]
    return ExpertsPlan(name, slices, [], widths), problems


def experts_plan(name: str, module: nn.Module, hidden: int, tp: int) -> tuple[ExpertsPlan | None, list[str]]:
    """The plan of one experts module (``trace.is_experts`` or ``is_stacked_experts``) and what keeps it
    from being split ``tp`` ways, if anything."""
    if is_stacked_experts(module):
        return _stacked_plan(name, module, tp)
    return _fused_plan(name, module, hidden, tp)
