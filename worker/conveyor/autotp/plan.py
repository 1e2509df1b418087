"""From a traced dataflow to a tensor-parallel plan, checked before any weight moves.

Roles (Megatron): a *column*-parallel linear reads the full residual stream and keeps a slice of its
outputs (heads or MLP channels); a *row*-parallel linear takes those slices and writes a partial sum into
the residual stream, which one all-reduce completes; everything else stays *replicated* (routers, heads
on pooled outputs, projections both read and written around a residual add). The roles are solved to a
fixed point from the traced producers/consumers, so a plan never leaves a split tensor where a full one
is read. Column and row linears linked by dataflow form a *group* (one attention, one MLP); a group
inside a module that counts heads is split by whole heads, and that module's head counts are divided.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from conveyor.autotp.experts_plan import ExpertsPlan, experts_plan, is_stacked_experts
from conveyor.autotp.layouts import (
    CONFIG_HEAD_COUNTS,
    FUSED_BLOCKS,
    FUSED_GROUPS,
    HEAD_COUNT_ATTRS,
    HEAD_DIM_ATTRS,
    HEAD_HALVES,
    HEAD_PARAMS,
    HEAD_WIDTH_ATTRS,
    REFUSED_MODULES,
)
from conveyor.autotp.split import Split
from conveyor.autotp.trace import LinearFlow, is_conv1d, is_experts

Role = Literal["column", "row", "replicated"]


class AutoTPError(ValueError):
    """A model this TP size cannot split (or that detection cannot place); raised before weights move."""


@dataclass
class LinearPlan:
    name: str
    role: Role
    split: Split | None = None  # column: of its outputs; row: of its inputs
    group: int = -1


@dataclass
class HeadsPlan:
    """A module that counts heads (attention): its head counts and widths divided, head-wise embeddings
    (T5's relative position bias) and parameters (GPT-OSS's sinks) split by heads."""

    name: str
    attrs: dict[str, int]  # attribute -> full value
    head_embeddings: list[str] = field(default_factory=list)
    config_attrs: dict[str, int] = field(default_factory=dict)  # of its own copy of the config (layouts.py)
    # its parameters with values per head: name -> (the heads dimension, the split)
    head_params: dict[str, tuple[int, Split]] = field(default_factory=dict)


@dataclass
class VocabPlan:
    embeddings: list[str]  # modules sharing the input embedding's weight
    lm_head: str | None
    tied: bool
    parallel: bool  # vocabulary-parallel (else replicated)
    vocab: int


@dataclass
class Plan:
    tp: int
    linears: dict[str, LinearPlan]
    experts: list[ExpertsPlan]
    heads: list[HeadsPlan]
    vocab: VocabPlan | None
    kept_whole: dict[str, str] = field(default_factory=dict)  # attention module -> why it is not split

    def rows(self) -> list[str]:
        return [n for n, lp in self.linears.items() if lp.role == "row"]

    def describe(self) -> str:
        counts = {
            r: sum(lp.role == r for lp in self.linears.values()) for r in ("column", "row", "replicated")
        }
        vocab = "none" if self.vocab is None else ("vocab-parallel" if self.vocab.parallel else "replicated")
        tied = " (tied)" if self.vocab and self.vocab.tied else ""
        whole = ""
        if self.kept_whole:
            name, why = next(iter(self.kept_whole.items()))
            whole = f"; {len(self.kept_whole)} attention modules kept whole (e.g. {name}: {why})"
        return (
            f"TP {self.tp}: {counts['column']} column-parallel, {counts['row']} row-parallel, "
            f"{counts['replicated']} replicated linears, {len(self.experts)} experts modules, "
            f"{len(self.heads)} attention modules; embeddings {vocab}{tied}{whole}"
        )


def _solve_roles(flows: dict[str, LinearFlow], experts: set[str], recut: set[str]) -> dict[str, Role]:
    """``recut``: linears cut at offsets that follow the split (``_recut``)."""
    roles: dict[str, Role] = {}
    for name, f in flows.items():
        if name in experts or f.calls == 0:
            roles[name] = "replicated"  # experts split inside themselves; an unused linear stays whole
        elif f.sliced and name not in recut:
            roles[name] = "replicated"  # cut at offsets its module computes for the whole width (trace.py)
        elif f.consumers and not f.writes_residual:
            roles[name] = "column"
        elif f.producers and not f.consumers:
            roles[name] = "row"
        else:
            roles[name] = "replicated"
    changed = True
    while changed:  # demote until every split tensor is read only by a row-parallel linear
        changed = False
        for name, f in flows.items():
            role = roles[name]
            demote = (role == "column" and any(roles[c] != "row" for c in f.consumers)) or (
                role == "row" and any(roles[p] != "column" for p in f.producers)
            )
            if role != "column":  # whatever is not column-parallel reads a full input
                for p in f.producers:
                    if roles[p] == "column" and role != "row":
                        roles[p] = "replicated"
                        changed = True
            if demote:
                roles[name] = "replicated"
                changed = True
    return roles


def _groups(flows: dict[str, LinearFlow], roles: dict[str, Role]) -> list[list[str]]:
    parent = {n: n for n in roles}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for name, f in flows.items():
        if roles[name] == "column":
            for c in f.consumers:
                parent[find(c)] = find(name)
    groups: dict[str, list[str]] = {}
    for name, role in roles.items():
        if role != "replicated":
            groups.setdefault(find(name), []).append(name)
    return list(groups.values())


def _prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _head_attrs(module: nn.Module) -> dict[str, int]:
    return {
        a: v
        for a in HEAD_COUNT_ATTRS + HEAD_WIDTH_ATTRS
        if isinstance(v := getattr(module, a, None), int) and v > 0
    }


def _is_heads_module(module: nn.Module) -> bool:
    # Llama-style attention keeps only head_dim (its reshapes infer the head count with -1); Funnel's
    # keeps neither and reads its config (layouts.CONFIG_HEAD_COUNTS)
    return any(isinstance(getattr(module, a, None), int) for a in HEAD_COUNT_ATTRS + HEAD_DIM_ATTRS) or (
        type(module).__name__ in CONFIG_HEAD_COUNTS
    )


def _head_dim(module: nn.Module, width: int) -> int:
    """The width of one of ``module``'s heads; ``width``: all its query heads' (its output projection's
    input)."""
    for a in HEAD_DIM_ATTRS:
        if isinstance(v := getattr(module, a, None), int) and v > 0:
            return v
    in_config = CONFIG_HEAD_COUNTS.get(type(module).__name__)
    if in_config:
        return width // int(getattr(module.config, in_config[0]))
    heads = next(
        (getattr(module, a) for a in HEAD_COUNT_ATTRS if isinstance(getattr(module, a, None), int)), 0
    )
    width = next(
        (getattr(module, a) for a in HEAD_WIDTH_ATTRS if isinstance(getattr(module, a, None), int)), 0
    )
    return width // heads if heads and width else 1


def _out_width(module: Any) -> int:
    return int(module.nf) if is_conv1d(module) else int(module.out_features)


def _in_width(module: Any) -> int:
    return int(module.weight.shape[0]) if is_conv1d(module) else int(module.in_features)


def _vocab_plan(model: Any, tp: int, lm_head_called: bool) -> VocabPlan | None:
    """``lm_head_called``: whether the forward calls the LM head module; one that reads its weight
    directly instead (MobileBERT: ``matmul(cat([decoder.weight.t(), dense.weight]))``) would get a
    vocabulary slice with no all-gather after it, so the vocabulary stays whole."""
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(inp, nn.Embedding):
        return None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    sharing = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding) and m.weight is inp.weight]
    lm_head = names.get(id(out)) if isinstance(out, nn.Linear) else None
    vocab = inp.num_embeddings
    tied = out is not None and getattr(out, "weight", None) is inp.weight
    parallel = vocab % tp == 0 and (lm_head is None or int(getattr(out, "out_features", 0)) % tp == 0)
    parallel = parallel and (lm_head is None or lm_head_called)
    return VocabPlan(sharing, lm_head, tied, parallel, vocab)


def _recut(flows: dict[str, LinearFlow], modules: dict[str, nn.Module]) -> set[str]:
    """Linears whose output is read only through cuts at offsets that a rank's copy of the config moves to
    its own blocks: their module is one of ``CONFIG_HEAD_COUNTS`` and the cuts tile the output."""
    return {
        n
        for n, f in flows.items()
        if f.slice_blocks and type(modules[n.rpartition(".")[0]]).__name__ in CONFIG_HEAD_COUNTS
    }


def _heads_plan(name: str, module: nn.Module, groups: int) -> HeadsPlan:
    """What to divide in an attention module whose heads are split. ``groups``: its fused groups
    (layouts.FUSED_GROUPS)."""
    counts = _head_attrs(module)
    emb = [
        f"{name}.{n}"
        for n, m in module.named_children()
        if isinstance(m, nn.Embedding) and m.embedding_dim in counts.values()
    ]
    config = getattr(module, "config", None)
    in_config = {a: int(getattr(config, a)) for a in CONFIG_HEAD_COUNTS.get(type(module).__name__, ())}
    # counted by the parameter itself: the output projection's input is heads x the value head width, which
    # need not be head_dim (MiMo-V2-Flash's); MiMo-V2-Flash's sinks exist in its sliding-window layers only
    params = {
        n: (dim, Split((p.shape[dim] // groups,), groups))
        for n, dim in HEAD_PARAMS.get(type(module).__name__, {}).items()
        if (p := getattr(module, n, None)) is not None
    }
    return HeadsPlan(name, counts, emb, in_config, params)


def make_plan(model: Any, flows: dict[str, LinearFlow], tp: int, lm_head_called: bool = True) -> Plan:
    """The plan for ``tp`` ranks, or ``AutoTPError`` listing every layer that ``tp`` does not divide.
    ``lm_head_called``: whether the traced forward called the LM head (``_vocab_plan``)."""
    modules = dict(model.named_modules())
    hidden = int(model.config.hidden_size)
    experts_names = {n for n in flows if is_experts(modules[n])}
    recut = _recut(flows, modules)
    roles = _solve_roles(flows, experts_names, recut)
    problems: list[str] = []
    linears = {n: LinearPlan(n, roles[n]) for n in flows if n not in experts_names}
    heads: list[HeadsPlan] = []
    kept_whole: dict[str, str] = {}  # attention module -> why its heads are not split
    claimed: set[str] = set()
    for gid, members in enumerate(_groups(flows, roles)):
        top = _prefix(members)
        owners = [
            n
            for n, m in modules.items()
            if n.startswith(top) and _is_heads_module(m) and any(x.startswith(n + ".") for x in members)
        ]
        whole = [
            n
            for n, lp in linears.items()
            if lp.role == "replicated" and flows[n].calls and any(n.startswith(o + ".") for o in owners)
        ]
        if whole:
            # A projection left whole inside the attention (OLMo 2's and OLMoE's q_norm / k_norm normalize
            # the whole q and k projections, every head at once, which the walk cannot see through): split
            # by heads, the attention would read all heads of one input and a rank's share of another, so
            # it stays whole on every rank, and the MLP or experts beside it are still split.
            for m in members:
                linears[m].role = "replicated"
            kept_whole[owners[-1]] = (
                f"{', '.join(sorted(w.rpartition('.')[2] for w in whole))} read through an op over all heads"
            )
            continue
        unit, groups, fused, halves = 1, 1, 1, False
        row_input = next(_in_width(modules[m]) for m in members if roles[m] == "row")
        if owners:
            owner = modules[owners[-1]]
            unit = _head_dim(owner, row_input)
            groups = FUSED_GROUPS.get(type(owner).__name__, 1)
            fused = FUSED_BLOCKS.get(type(owner).__name__, 1)
            halves = type(owner).__name__ in HEAD_HALVES
            for o in owners:
                if o not in claimed:
                    claimed.add(o)
                    heads.append(_heads_plan(o, modules[o], groups))
        row_width = row_input // groups
        for m in members:
            lp = linears[m]
            lp.group = gid
            width = _out_width(modules[m]) if lp.role == "column" else _in_width(modules[m])
            if groups > 1:
                blocks: tuple[int, ...] = (row_width,) * (width // groups // row_width)
            else:
                cut = flows[m].slice_blocks if m in recut else None
                if fused > 1 and width == fused * row_input:
                    cut = (row_input,) * fused
                blocks = (flows[m].split_sizes or cut or (width,)) if lp.role == "column" else (width,)
            repeats = groups
            if halves and lp.role == "column":
                blocks, repeats = (width // 2,), 2
            lp.split = Split(blocks, repeats)
            if repeats * sum(blocks) != width:
                problems.append(
                    f"{m} ({lp.role}-parallel): width {width} is not {repeats} groups of {blocks}"
                )
            for b in blocks:
                if b % (tp * unit):
                    what = f"{b // unit} heads of width {unit}" if unit > 1 else f"{b} channels"
                    problems.append(f"{m} ({lp.role}-parallel): {what} cannot be split {tp} ways")
    for h in heads:
        problems += [f"{h.name}.{a} = {v} is not divisible by {tp}" for a, v in h.attrs.items() if v % tp]
        problems += [
            f"{h.name}.config.{a} = {v} is not divisible by {tp}" for a, v in h.config_attrs.items() if v % tp
        ]
    experts = []
    stacked = {n for n, m in modules.items() if is_stacked_experts(m)}
    for n in sorted(experts_names | stacked):
        ep, found = experts_plan(n, modules[n], hidden, tp)
        problems += found
        if ep is not None:
            experts.append(ep)
    if tp > 1:
        problems += list(
            {
                REFUSED_MODULES[type(m).__name__]
                for m in modules.values()
                if type(m).__name__ in REFUSED_MODULES
            }
        )
    config = model.config
    for attr in ("num_attention_heads", "num_key_value_heads"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value % tp:
            problems.append(f"config.{attr} = {value} is not divisible by {tp}")
    if tp > 1 and not any(lp.role == "row" for lp in linears.values()) and not experts:
        problems.append(
            "detection found no linear that writes into the residual stream (no row-parallel layer)"
        )
    if problems:
        raise AutoTPError(
            f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r}) cannot be split "
            f"over tensor-parallel size {tp}: " + "; ".join(sorted(set(problems)))
        )
    return Plan(tp, linears, experts, heads, _vocab_plan(model, tp, lm_head_called), kept_whole)


def hf_plan_mismatches(model: Any, plan: Plan) -> list[str]:
    """Where HF's own ``base_model_tp_plan`` (when the family has one) disagrees with the detected roles."""
    hf = getattr(model.config, "base_model_tp_plan", None) or {}
    prefix = getattr(model, "base_model_prefix", "")
    wanted = {"colwise": "column", "rowwise": "row"}
    out = []
    for pattern, style in hf.items():
        role = wanted.get(style)
        if role is None:
            continue
        rx = re.compile("^(" + re.escape(prefix) + r"\.)?" + re.escape(pattern).replace(r"\*", r"\d+") + "$")
        for name, lp in plan.linears.items():
            if rx.match(name) and lp.role != role:
                out.append(f"{name}: detected {lp.role}, HF plan says {style}")
    return out
