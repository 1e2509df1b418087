"""Apply a plan on one rank: keep this rank's slices of every split weight, divide head counts, and add
the collectives of the forward pass (the only ones: one all-reduce per row-parallel module, one
all-reduce per vocabulary-parallel embedding, one all-gather of vocabulary-parallel logits).

A ``ShardLedger`` passed in records what became of each parameter (which full parameter it is a slice
of, along which dims and indices; a bias zeroed on ranks past 0), so a model sharded on the meta device
can read exactly those slices from a checkpoint afterwards (checkpoint.py)."""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from conveyor.autotp.layouts import HEAD_BIAS_ARGS
from conveyor.autotp.plan import Plan
from conveyor.autotp.split import Split
from conveyor.autotp.trace import is_conv1d
from conveyor.distributed import held_weakly


class ShardLedger:
    """What sharding did to each parameter: the full parameter it came from and the slices taken."""

    def __init__(self) -> None:
        # id(current parameter) -> (the parameter as it was before sharding, [(dim, index), ...]); the
        # parameters are kept as values so no id is reused while the ledger lives
        self._origin: dict[int, tuple[nn.Parameter, list[tuple[int, torch.Tensor]]]] = {}
        self._zeroed: set[int] = set()

    def sliced(self, old: nn.Parameter, new: nn.Parameter, dim: int, index: torch.Tensor) -> None:
        root, ops = self._origin.get(id(old), (old, []))
        self._origin[id(new)] = (root, [*ops, (dim, index)])

    def zeroed(self, param: nn.Parameter) -> None:
        self._zeroed.add(id(param))

    def origin(self, param: nn.Parameter) -> tuple[nn.Parameter, list[tuple[int, torch.Tensor]]]:
        """The unsharded parameter ``param`` comes from (itself if never sliced) and the slices, in order."""
        return self._origin.get(id(param), (param, []))

    def is_zeroed(self, param: nn.Parameter) -> bool:
        return id(param) in self._zeroed


def replace_param(model: nn.Module, old: nn.Parameter, new: nn.Parameter) -> None:
    # a tied weight is one Parameter held by several modules: every holder gets the same slice
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is old:
                module._parameters[name] = new


def _slice(
    model: nn.Module, module: nn.Module, attr: str, dim: int, index: torch.Tensor, ledger: ShardLedger
) -> None:
    old = getattr(module, attr)
    # the user's model may already be on its GPU (DeepSpeed's examples move it first)
    new = nn.Parameter(old.detach().index_select(dim, index.to(old.device)).contiguous(), requires_grad=False)
    ledger.sliced(old, new, dim, index)
    replace_param(model, old, new)


def _all_reduce_hook(group: Any) -> Any:
    tp_group = held_weakly(group)

    def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        # why: a row-parallel module yields a partial sum on each rank; the residual stream needs the sum
        dist.all_reduce(out, group=tp_group())
        return out

    return hook


def _shard_linears(model: nn.Module, plan: Plan, rank: int, group: Any, ledger: ShardLedger) -> None:
    modules = dict(model.named_modules())
    for lp in plan.linears.values():
        if lp.role == "replicated" or lp.split is None:
            continue
        m = modules[lp.name]
        index = lp.split.index(rank, plan.tp)
        conv = is_conv1d(m)
        if lp.role == "column":
            _slice(model, m, "weight", 1 if conv else 0, index, ledger)
            if m.bias is not None:
                _slice(model, m, "bias", 0, index, ledger)
            if conv:
                m.nf = len(index)
            else:
                m.out_features = len(index)
        else:
            _slice(model, m, "weight", 0 if conv else 1, index, ledger)
            if m.bias is not None and rank != 0:
                with torch.no_grad():
                    m.bias.zero_()  # the bias is added once: by rank 0's partial sum
                ledger.zeroed(m.bias)
            if not conv:
                m.in_features = len(index)
            m.register_forward_hook(_all_reduce_hook(group))


def _shard_experts(model: nn.Module, plan: Plan, rank: int, group: Any, ledger: ShardLedger) -> None:
    modules = dict(model.named_modules())
    for ep in plan.experts:
        m = modules[ep.name]
        for path, (dim, split) in ep.slices.items():
            owner, _, attr = path.rpartition(".")
            _slice(model, m.get_submodule(owner), attr, dim, split.index(rank, plan.tp), ledger)
        for path in ep.once:
            if rank != 0:
                bias = m.get_parameter(path)
                with torch.no_grad():
                    bias.zero_()  # added after the down projection: once, by rank 0's partial sum
                ledger.zeroed(bias)
        for path, value in ep.widths.items():
            owner, _, attr = path.rpartition(".")
            setattr(m.get_submodule(owner), attr, value // plan.tp)
        m.register_forward_hook(_all_reduce_hook(group))


def _shard_heads(model: nn.Module, plan: Plan, rank: int, ledger: ShardLedger) -> None:
    modules = dict(model.named_modules())
    for hp in plan.heads:
        m = modules[hp.name]
        for attr, value in hp.attrs.items():
            setattr(m, attr, value // plan.tp)
        if hp.config_attrs:
            # why: its forward cuts q|k|v at offsets it reads from the config, which every layer (and
            # generate) shares: this module alone gets a copy counting the rank's heads (layouts.py)
            m.config = copy.copy(m.config)
            for attr, value in hp.config_attrs.items():
                setattr(m.config, attr, value // plan.tp)
        for attr, (dim, split) in hp.head_params.items():
            _slice(model, m, attr, dim, split.index(rank, plan.tp), ledger)
        for name in hp.head_embeddings:
            emb = modules[name]
            assert isinstance(emb, nn.Embedding)
            _slice(model, emb, "weight", 1, Split((emb.embedding_dim,)).index(rank, plan.tp), ledger)
            emb.embedding_dim //= plan.tp
        if type(m).__name__ in HEAD_BIAS_ARGS:
            _slice_head_bias(m, *HEAD_BIAS_ARGS[type(m).__name__], rank=rank, tp=plan.tp)


def _slice_head_bias(module: nn.Module, arg: str, layout: str, rank: int, tp: int) -> None:
    position = list(inspect.signature(module.forward).parameters).index(arg)

    def take(bias: torch.Tensor, batch: int) -> torch.Tensor:
        if layout == "heads":  # [heads, ...]
            size = bias.shape[0] // tp
            return bias[rank * size : (rank + 1) * size]
        if layout == "batch_then_heads":  # [batch, heads, ...]
            size = bias.shape[1] // tp
            return bias[:, rank * size : (rank + 1) * size]
        per = bias.view(batch, -1, *bias.shape[1:])  # [batch, heads, ...]
        size = per.shape[1] // tp
        return per[:, rank * size : (rank + 1) * size].reshape(-1, *bias.shape[1:])

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # why: the bias was built for all heads outside this module; this rank computes only its heads
        batch = args[0].shape[0] if args else kwargs["hidden_states"].shape[0]
        if arg in kwargs and kwargs[arg] is not None:
            kwargs[arg] = take(kwargs[arg], batch)
        elif len(args) > position and args[position] is not None:
            args = (*args[:position], take(args[position], batch), *args[position + 1 :])
        return args, kwargs

    module.register_forward_pre_hook(pre, with_kwargs=True)


def _shard_vocab(model: nn.Module, plan: Plan, rank: int, group: Any, ledger: ShardLedger) -> None:
    vp = plan.vocab
    if vp is None or not vp.parallel or plan.tp == 1:
        return
    modules = dict(model.named_modules())
    tp_group = held_weakly(group)
    size = vp.vocab // plan.tp
    start = rank * size
    index = torch.arange(start, start + size)
    first = modules[vp.embeddings[0]]
    _slice(model, first, "weight", 0, index, ledger)  # every module sharing it (and a tied LM head) follows
    for name in vp.embeddings:
        emb = modules[name]
        emb.num_embeddings = size
        emb.padding_idx = None  # inference only; a global padding index means nothing in a slice
        masks: list[torch.Tensor] = []

        def pre(_m: nn.Module, args: tuple, masks: list = masks) -> tuple:
            ids = args[0] - start
            outside = (ids < 0) | (ids >= size)
            masks.append(outside)
            return (ids.masked_fill(outside, 0), *args[1:])

        def post(_m: nn.Module, _args: tuple, out: torch.Tensor, masks: list = masks) -> torch.Tensor:
            out = out.masked_fill(masks.pop().unsqueeze(-1), 0)
            # why: each rank looked up only the tokens of its vocabulary slice; the sum holds every token
            dist.all_reduce(out, group=tp_group())
            return out

        emb.register_forward_pre_hook(pre)
        emb.register_forward_hook(post)
    if vp.lm_head is not None:
        head = modules[vp.lm_head]
        assert isinstance(head, nn.Linear)
        if not vp.tied:
            _slice(model, head, "weight", 0, index, ledger)
        if head.bias is not None:
            _slice(model, head, "bias", 0, index, ledger)
        head.out_features = size

        def gather(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            # why: each rank scored only its vocabulary slice; generate and sampling need every logit
            parts = [torch.empty_like(out) for _ in range(plan.tp)]
            dist.all_gather(parts, out.contiguous(), group=tp_group())
            return torch.cat(parts, dim=-1)

        head.register_forward_hook(gather)


def shard_model(
    model: nn.Module, plan: Plan, rank: int, group: Any, ledger: ShardLedger | None = None
) -> ShardLedger:
    """Turn the full ``model`` into rank ``rank``'s shard of ``plan``, in place; returns the ledger of
    what each parameter became."""
    ledger = ledger or ShardLedger()
    if plan.tp == 1:
        return ledger
    _shard_vocab(model, plan, rank, group, ledger)
    _shard_linears(model, plan, rank, group, ledger)
    _shard_experts(model, plan, rank, group, ledger)
    _shard_heads(model, plan, rank, ledger)
    return ledger
