"""``PipelineModule``: a model given as a list of layers, of which each stage builds only its own.

Ported from DeepSpeed's ``deepspeed.pipe``: layers are ``nn.Module``s, ``LayerSpec``s (built lazily, so a
stage never allocates another stage's weights) or plain callables; ``TiedLayerSpec``s with the same key
share one module per stage, and the engine all-reduces the tied weights' gradients across the stages
that hold a copy. Parameters are named by *global* layer index (``layers.7.weight``, ``tied.embed.weight``)
whatever the stage, so checkpoints move between stage counts.

One difference from DeepSpeed: ``seed_layers`` defaults to True, so layer i is initialised from
``base_seed + i`` and the model is the same for every layout (a tied module from its first index).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from conveyor.pipe.partition import partition
from conveyor.topology import Layout, LayoutError, Topology


class LayerSpec:
    """Build ``typename(*module_args, **module_kwargs)`` only on the stage that owns the layer."""

    def __init__(self, typename: Callable[..., nn.Module], *module_args: Any, **module_kwargs: Any):
        if not callable(typename):
            raise TypeError(f"LayerSpec needs a module class (or factory), got {typename!r}")
        self.typename = typename
        self.module_args = module_args
        self.module_kwargs = module_kwargs

    def build(self) -> nn.Module:
        return self.typename(*self.module_args, **self.module_kwargs)

    @property
    def name(self) -> str:
        return getattr(self.typename, "__name__", type(self.typename).__name__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class TiedLayerSpec(LayerSpec):
    """A layer whose module is shared by every occurrence of ``key`` (e.g. input embedding and output
    projection). ``forward_fn(module, inputs)`` replaces ``module(inputs)`` where given;
    ``tied_weight_attr`` names the parameter(s) kept equal across stages."""

    def __init__(
        self,
        key: str,
        typename: Callable[..., nn.Module],
        *module_args: Any,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        tied_weight_attr: str | Sequence[str] = "weight",
        **module_kwargs: Any,
    ):
        super().__init__(typename, *module_args, **module_kwargs)
        if not key or "." in key:
            raise ValueError(f"TiedLayerSpec key {key!r} must be a non-empty name without dots")
        self.key = key
        self.forward_fn = forward_fn
        self.tied_weight_attr = (
            [tied_weight_attr] if isinstance(tied_weight_attr, str) else list(tied_weight_attr)
        )

    def __repr__(self) -> str:
        return f"TiedLayerSpec({self.key!r}, {self.name})"


def _describe(layer: Any) -> tuple[str, int, nn.Module | None]:
    """(class name, parameter count, the module) without allocating weights: LayerSpecs are built on the
    meta device (the module is None for a plain callable)."""
    if isinstance(layer, LayerSpec):
        with torch.device("meta"):
            module = layer.build()
        return layer.name, sum(p.numel() for p in module.parameters()), module
    if isinstance(layer, nn.Module):
        return type(layer).__name__, sum(p.numel() for p in layer.parameters()), layer
    if callable(layer):
        return getattr(layer, "__name__", type(layer).__name__), 0, None
    raise TypeError(f"pipeline layer {layer!r} is not an nn.Module, LayerSpec or callable")


def _tied_signature(spec: TiedLayerSpec, module: nn.Module) -> str:
    """What must agree between the occurrences of a tied key: the module's class, its parameters' shapes
    and the tied attributes (each a parameter of the module)."""
    params = dict(module.named_parameters())
    for attr in spec.tied_weight_attr:
        if not isinstance(getattr(module, attr, None), nn.Parameter):
            raise ValueError(
                f"TiedLayerSpec {spec.key!r}: tied_weight_attr {attr!r} is not a parameter of its module "
                f"({type(module).__name__} has parameters {sorted(params)}): name one of them"
            )
    shapes = ", ".join(f"{name} {tuple(p.shape)}" for name, p in params.items())
    return f"{type(module).__name__} [{shapes}] tying {spec.tied_weight_attr}"


def _check_tied_specs(layers: Sequence[Any], modules: Sequence[nn.Module | None]) -> None:
    """Every occurrence of a key must build the same module: a stage builds the shared module from the
    first occurrence it holds, so a later one that differs would be ignored on one stage and used on
    another (and the tied broadcast of differently sized weights breaks the process group)."""
    first: dict[str, tuple[int, str]] = {}
    for idx, layer in enumerate(layers):
        if not isinstance(layer, TiedLayerSpec):
            continue
        module = modules[idx]
        assert module is not None  # a TiedLayerSpec is a LayerSpec: described by building it
        signature = _tied_signature(layer, module)
        first_idx, first_signature = first.setdefault(layer.key, (idx, signature))
        if signature != first_signature:
            raise ValueError(
                f"TiedLayerSpec {layer.key!r} at layer {idx} builds {signature}, but its first occurrence, "
                f"layer {first_idx}, builds {first_signature}: the occurrences of a key share one module, so "
                "give them the same class and arguments (use forward_fn for a different use of it)"
            )


class PipelineModule(nn.Module):
    def __init__(
        self,
        layers: Sequence[Any],
        num_stages: int | None = None,
        topology: Topology | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        seed_layers: bool = True,
        base_seed: int = 1234,
        partition_method: str | Sequence[int] = "parameters",
        activation_checkpoint_interval: int = 0,
    ):
        super().__init__()
        layers = list(layers)
        if not layers:
            raise ValueError("PipelineModule needs at least one layer")
        if activation_checkpoint_interval < 0:
            raise ValueError(
                f"activation_checkpoint_interval must be >= 0, got {activation_checkpoint_interval}"
            )
        self.topology = topology or _default_topology(num_stages)
        if num_stages is not None and num_stages != self.topology.num_stages:
            raise LayoutError(
                f"num_stages={num_stages} disagrees with the topology's {self.topology.num_stages} stages"
            )
        self.num_stages = self.topology.num_stages
        self.stage_id = self.topology.stage
        self.loss_fn = loss_fn
        self.activation_checkpoint_interval = activation_checkpoint_interval

        described = [_describe(layer) for layer in layers]
        _check_tied_specs(layers, [module for _, _, module in described])
        self.layer_names = [name for name, _, _ in described]
        self.parts = partition(
            partition_method, self.num_stages, [count for _, count, _ in described], self.layer_names
        )
        self.start, self.stop = self.parts[self.stage_id], self.parts[self.stage_id + 1]

        first_index: dict[str, int] = {}
        self.tied_stages: dict[str, list[int]] = {}  # key -> stages holding a copy
        self.tied_weight_attrs: dict[str, list[str]] = {}
        for idx, layer in enumerate(layers):
            if isinstance(layer, TiedLayerSpec):
                first_index.setdefault(layer.key, idx)
                stage = self.stage_of_layer(idx)
                holders = self.tied_stages.setdefault(layer.key, [])
                if stage not in holders:
                    holders.append(stage)
                self.tied_weight_attrs[layer.key] = layer.tied_weight_attr

        self.layers = nn.ModuleDict()  # global index -> module: names stay put when stages change
        self.tied = nn.ModuleDict()  # key -> the shared module
        self._funcs: list[tuple[int, Callable[[Any], Any]]] = []
        for idx in range(self.start, self.stop):
            layer = layers[idx]
            if isinstance(layer, TiedLayerSpec):
                if layer.key not in self.tied:
                    self.tied[layer.key] = self._build(layer, base_seed + first_index[layer.key], seed_layers)
                module = self.tied[layer.key]
                fn = functools.partial(layer.forward_fn, module) if layer.forward_fn else module
            elif isinstance(layer, LayerSpec):
                fn = self.layers[str(idx)] = self._build(layer, base_seed + idx, seed_layers)
            elif isinstance(layer, nn.Module):
                fn = self.layers[str(idx)] = layer
            else:
                fn = layer
            self._funcs.append((idx, fn))
        self.tied_groups = self._make_tied_groups()

    @staticmethod
    def _build(spec: LayerSpec, seed: int, seed_layers: bool) -> nn.Module:
        if not seed_layers:
            return spec.build()
        # Seed per layer without disturbing the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return spec.build()

    def _make_tied_groups(self) -> dict[str, tuple[Any, list[int]]]:
        """Process group of the stages holding each tied key, one per replica and tensor rank (created by
        every rank, in the same order, since new_group is collective)."""
        groups: dict[str, tuple[Any, list[int]]] = {}
        if not (dist.is_available() and dist.is_initialized()):
            return groups
        layout = self.topology.layout
        for key, stages in self.tied_stages.items():
            if len(stages) < 2:
                continue
            for replica in range(layout.replicas):
                for tp in range(layout.tensor_parallel):
                    ranks = [layout.rank(replica, s, tp) for s in stages]
                    group = dist.new_group(ranks)
                    if self.topology.rank in ranks:
                        groups[key] = (group, ranks)
        return groups

    def stage_of_layer(self, idx: int) -> int:
        for stage in range(self.num_stages):
            if self.parts[stage] <= idx < self.parts[stage + 1]:
                return stage
        raise IndexError(f"layer {idx} outside 0..{self.parts[-1] - 1}")

    def tied_owner(self, key: str) -> bool:
        """True on the lowest stage holding ``key``: the copy counted once in the gradient norm."""
        return self.tied_stages[key][0] == self.stage_id

    def tied_parameters(self, key: str) -> list[nn.Parameter]:
        return [getattr(self.tied[key], attr) for attr in self.tied_weight_attrs[key]]

    def forward(self, x: Any) -> Any:
        interval = self.activation_checkpoint_interval
        if interval == 0 or not torch.is_grad_enabled():
            for _, fn in self._funcs:
                x = fn(x)
            return x
        for begin in range(0, len(self._funcs), interval):
            chunk = [fn for _, fn in self._funcs[begin : begin + interval]]
            x = checkpoint(_run_chunk, chunk, x, use_reentrant=False)
        return x

    def extra_repr(self) -> str:
        return f"stage {self.stage_id} of {self.num_stages}, layers {self.start}..{self.stop - 1}"


def _run_chunk(chunk: list[Callable[[Any], Any]], x: Any) -> Any:
    for fn in chunk:
        x = fn(x)
    return x


def _default_topology(num_stages: int | None) -> Topology:
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else 1
    stages = 1 if num_stages is None and not initialized else num_stages
    if stages is None:
        raise LayoutError("PipelineModule needs num_stages (or a topology)")
    if stages > 1 and not initialized:
        raise LayoutError(
            f"num_stages={stages} needs a process group of {stages} ranks or more: call "
            "conveyor.init_distributed() first (launch with `conveyor run` or torchrun)"
        )
    if world % stages:
        raise LayoutError(
            f"num_stages={stages} does not divide the world size {world}: launch replicas x stages processes"
        )
    return Topology(Layout(replicas=world // stages, stages=stages))
