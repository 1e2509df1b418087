"""Dataflow of a built model, read from one traced forward pass: which linear feeds which.

One forward on a short input runs with autograd recording; hooks note the autograd node each linear
(``nn.Linear``, GPT-2's ``Conv1D``, a MoE experts module with 3D weights) takes in and gives out, and the
nodes that bound the residual stream (norm inputs and outputs, embedding outputs, the model's outputs;
a norm of each head alone, such as Qwen3's ``q_norm``, is inside the attention and bounds nothing).
Walking the graph backwards from each linear's input to the nearest linear outputs gives its producers;
walking back from each norm input and model output gives the linears that write into the residual
stream. A split of a linear's output on its last dimension (GPT-2's ``c_attn(...).split``) is noted as a
fused layout of blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

_SPLITS = ("SplitBackward0", "SplitWithSizesBackward0")
# Elementwise ops that keep every column where it was: a split or cut behind them is the linear's own
# (DBRX clamps its fused q|k|v, ``clip_qkv``, before splitting it)
_LAYOUT_KEEPING = (
    "ClampBackward0",
    "ClampBackward1",
    "ClampMinBackward0",
    "ClampMaxBackward0",
    "ToCopyBackward0",
)


def is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 family): a linear whose weight is stored [in, out]
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_experts(module: nn.Module) -> bool:
    """A MoE experts module holding every expert's weights as 3D tensors [experts, out, in] (or [experts,
    in, out]), and maybe their biases [experts, out] (GPT-OSS's)."""
    params = list(module.parameters(recurse=False))
    weights = [p for p in params if p.dim() == 3]
    if len(weights) < 2:
        return False
    experts = weights[0].shape[0]
    return all(p.dim() in (2, 3) and p.shape[0] == experts for p in params)


def is_norm(module: nn.Module) -> bool:
    return (
        isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm))
        or "norm" in type(module).__name__.lower()
    )


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_experts(module)


@dataclass
class LinearFlow:
    """What one traced linear reads from and writes to."""

    name: str
    producers: set[str] = field(default_factory=set)  # linears whose outputs reach its input directly
    consumers: set[str] = field(default_factory=set)  # linears its output reaches directly
    writes_residual: bool = False  # its output reaches a norm or a model output directly
    split_sizes: tuple[int, ...] | None = None  # its output is split on the last dim into these blocks
    # its output is cut on the last dim at offsets written in the forward (Phi-3's fused q|k|v read as
    # qkv[..., :query_pos] with query_pos from the config): a rank's share of its columns matches those
    # offsets only where layouts.py says how they are computed
    sliced: bool = False
    # the widths of those cuts when they tile the whole output in order and nothing else reads it
    slice_blocks: tuple[int, ...] | None = None
    calls: int = 0


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def main_output(out: Any) -> torch.Tensor | None:
    """A model output's logits, else its first floating tensor (an encoder's ``last_hidden_state``),
    detached; None if it has no values (the meta device) or no floating tensor."""
    fields = dict(out) if isinstance(out, Mapping) else {"0": out}
    first = fields.get("logits")
    if not isinstance(first, torch.Tensor):
        first = next((t for t in _tensors(fields) if t.is_floating_point()), None)
    if first is None or first.is_meta or isinstance(first, FakeTensor):
        return None
    return first.detach()


def _on_last_dim(node: Any, ndim: int) -> bool:
    """Whether ``node`` (a split or slice) acts on the last dim. Autograd keeps a negative dim as given
    but reads it back unsigned (``chunk(2, dim=-1)``, Phi-3's gate|up, saves 2**64 - 1)."""
    dim = getattr(node, "_saved_dim", None)
    if dim is None:
        return False
    dim = int(dim)
    if dim >= 2**63:
        dim -= 2**64
    return dim in (-1, ndim - 1)


def _split_sizes(node: Any, width: int, ndim: int) -> tuple[int, ...] | None:
    """The block widths if ``node`` splits a [.., width] tensor on its last dim, else None."""
    name = type(node).__name__
    if name not in _SPLITS or not _on_last_dim(node, ndim):
        return None
    if name == "SplitWithSizesBackward0":
        return tuple(int(s) for s in node._saved_split_sizes)
    size = int(node._saved_split_size)
    return tuple([size] * (width // size)) if width % size == 0 else None


def _last_dim_cut(node: Any, width: int, ndim: int) -> tuple[int, int] | None:
    """[start, stop) if ``node`` takes part of a [.., width] tensor's last dim (``x[..., a:b]``, not all
    of it), else None. An open end (``x[..., a:]``) is saved as 2**63 - 1."""
    if type(node).__name__ != "SliceBackward0" or not _on_last_dim(node, ndim):
        return None
    start, stop = int(node._saved_start), min(int(node._saved_end), width)
    return (start, stop) if start > 0 or stop < width else None


def _tiling(cuts: list[tuple[int, int]], width: int) -> tuple[int, ...] | None:
    """The widths of ``cuts`` if, in order, they cover [0, width) exactly once."""
    ordered = sorted(set(cuts))
    if len(ordered) != len(cuts) or ordered[0][0] != 0 or ordered[-1][1] != width:
        return None
    if any(a[1] != b[0] for a, b in zip(ordered, ordered[1:], strict=False)):
        return None
    return tuple(b - a for a, b in ordered)


class Tracer:
    def __init__(self, model: nn.Module, skip: set[str], stream_width: int | None = None):
        """``stream_width``: the residual stream's width (``config.hidden_size``), which a norm of each
        head alone is narrower than (``_per_head``)."""
        self.model = model
        self.stream_width = stream_width
        self.flows: dict[str, LinearFlow] = {}
        self._out_node: dict[Any, str] = {}  # autograd node of a linear's output -> linear name
        self._out_shape: dict[str, tuple[int, int]] = {}  # name -> (width, ndim) of its output
        self._in_nodes: list[tuple[str, Any]] = []
        self._stops: set[Any] = set()  # norm and embedding outputs: the walk ends there
        self._sinks: list[Any] = []  # norm inputs and model outputs
        self._handles: list[Any] = []
        # the forward's logits (or first tensor), detached: the whole model's answer to the probe input,
        # which split_check.py compares the split model's with (None on the meta device: no values)
        self.output: torch.Tensor | None = None
        # skipped modules (the LM head) the forward called: one that is not called has its weight read
        # directly (MobileBERT's ``matmul(cat([decoder.weight.t(), dense.weight]))``)
        self.skipped_called: set[str] = set()
        for name, module in model.named_modules():
            if name in skip:
                self._hook_stop(module)
                self._hook_skipped_call(name, module)
            elif is_linear(module):
                self.flows[name] = LinearFlow(name)
                self._hook_linear(name, module)
            elif is_norm(module):
                self._hook_norm(module)
            elif isinstance(module, nn.Embedding):
                self._hook_stop(module)

    def _hook_linear(self, name: str, module: nn.Module) -> None:
        def pre(_m: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].grad_fn is not None:
                self._in_nodes.append((name, args[0].grad_fn))

        def post(_m: nn.Module, _args: tuple, out: Any) -> None:
            self.flows[name].calls += 1
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                self._out_node[out.grad_fn] = name
                self._out_shape[name] = (out.shape[-1], out.dim())

        self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def _per_head(self, module: nn.Module, args: tuple) -> bool:
        """A norm of each head alone (Qwen3's and Gemma 3's ``q_norm`` / ``k_norm``: the input viewed as
        [batch, seq, heads, head_dim], one weight of ``head_dim`` shared by every head) sits between a
        projection and the attention that reads it, not at the residual stream: the walk passes through
        it, so that projection is found feeding the attention's output projection (column-parallel) and
        a rank's heads are normalized as in the whole model. A norm over a whole projection (OLMo 2's,
        over every head at once) still bounds the walk: splitting it by heads would change its result."""
        first = next(iter(_tensors(args[:1])), None)
        if self.stream_width is None or first is None or first.dim() < 4:
            return False
        width = first.shape[-1]
        shared = all(p.numel() == width for p in module.parameters(recurse=False))
        return width < self.stream_width and shared

    def _hook_norm(self, module: nn.Module) -> None:
        def pre(_m: nn.Module, args: tuple) -> None:
            if not self._per_head(module, args):
                self._sinks += [t.grad_fn for t in _tensors(args[:1]) if t.grad_fn is not None]

        def post(_m: nn.Module, args: tuple, out: Any) -> None:
            if not self._per_head(module, args):
                self._stops.update(t.grad_fn for t in _tensors(out) if t.grad_fn is not None)

        self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def _hook_skipped_call(self, name: str, module: nn.Module) -> None:
        def post(_m: nn.Module, _args: tuple, _out: Any) -> None:
            self.skipped_called.add(name)

        self._handles.append(module.register_forward_hook(post))

    def _hook_stop(self, module: nn.Module) -> None:
        def post(_m: nn.Module, _args: tuple, out: Any) -> None:
            self._stops.update(t.grad_fn for t in _tensors(out) if t.grad_fn is not None)

        self._handles.append(module.register_forward_hook(post))

    def _walk(self, start: Any) -> set[tuple[str, Any]]:
        """Linears whose outputs reach ``start`` without passing another linear, norm or embedding; each
        with the node that consumed its output."""
        found: set[tuple[str, Any]] = set()
        seen: set[Any] = set()
        stack = [(start, None)]
        while stack:
            node, child = stack.pop()
            if node is None:
                continue
            if node in self._out_node:
                found.add((self._out_node[node], child))
                continue
            if node in seen or node in self._stops:
                continue
            seen.add(node)
            stack += [(nxt, node) for nxt, _ in node.next_functions]
        return found

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, LinearFlow]:
        params = [p for p in self.model.parameters() if not p.requires_grad and p.is_floating_point()]
        for p in params:  # a graph exists only where something requires grad
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                out = self.model(**inputs)
                self.output = main_output(out)
                self._sinks += [t.grad_fn for t in _tensors(dict(out)) if t.grad_fn is not None]
                self._link()
        finally:
            for h in self._handles:
                h.remove()
            for p in params:
                p.requires_grad_(False)
        return self.flows

    def _link(self) -> None:
        for name, node in self._in_nodes:
            node_start = node if node not in self._stops else None
            for producer, _child in self._walk(node_start):
                self.flows[name].producers.add(producer)
                self.flows[producer].consumers.add(name)
        for sink in self._sinks:
            for producer, _child in self._walk(sink if sink not in self._stops else None):
                self.flows[producer].writes_residual = True
        # a fused output split into blocks: look at what consumed each linear's output node
        consumers = self._consumer_map()
        for node, name in self._out_node.items():
            width, ndim = self._out_shape[name]
            cuts = []
            for consumer in _through_layout_keeping(node, consumers):
                sizes = _split_sizes(consumer, width, ndim)
                if sizes is not None and sum(sizes) == width:
                    self.flows[name].split_sizes = sizes
                cuts.append(_last_dim_cut(consumer, width, ndim))
            found = [c for c in cuts if c is not None]
            if found:
                self.flows[name].sliced = True
                if len(found) == len(cuts):  # read through the cuts alone
                    self.flows[name].slice_blocks = _tiling(found, width)

    def _consumer_map(self) -> dict[Any, list[Any]]:
        # autograd edges point backwards (node -> its inputs); invert them once for the whole graph
        found: dict[Any, list[Any]] = {}
        seen: set[Any] = set()
        stack = list(self._sinks)
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            for nxt, _ in node.next_functions:
                if nxt is not None:
                    found.setdefault(nxt, []).append(node)
                    stack.append(nxt)
        return found


def _through_layout_keeping(node: Any, consumers: dict[Any, list[Any]]) -> list[Any]:
    """The nodes that read ``node``'s output, looking through ``_LAYOUT_KEEPING`` ops."""
    found = []
    for c in consumers.get(node, ()):
        found += _through_layout_keeping(c, consumers) if type(c).__name__ in _LAYOUT_KEEPING else [c]
    return found
