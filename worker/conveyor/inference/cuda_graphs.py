"""A stage's forward on a GPU: prompt passes compiled, decode steps compiled and captured in CUDA graphs.

Decode on a 7B model is about 1,400 small kernels per token when run eagerly; launched from Python
they cost more than the HBM reads they do (measured on an H200 at batch 1: 16.9 ms eager, 6.5 ms as a
CUDA graph, 5.7 ms of it kernels, against a 3.1 ms roofline). torch.compile fuses the elementwise work
(norms, rotary, residuals, softmax) into a few kernels per layer; the graph removes the launch gaps.
The stage model's decode forward has static shapes (fixed lanes, static KV cache, positions as a
tensor: see model.py), so it is compiled and captured once per (lane range, shape) and replayed.
Before the first capture of a micro-batch size, the plain linear layers are routed through
skinny_matmul.py, which measures cuBLAS against its Triton kernel for each weight shape at that size
and keeps the faster.

Prompt passes (prefill and the chunks of a long prompt) are compiled too, with dynamic shapes, so one
compile serves every prompt length: inductor fuses their norms, rotary and gated activations, which
eager runs as separate full-size passes over [S, hidden] (measured on an H200, Llama-2-7B shape, a
2,048-token prompt: 49.5 ms compiled against 64 eager). Their compile has its own top-level function
(``_prompt_pass``), so its dynamic shapes never leak into the decode step's: dynamo keeps its shape
history per code object, and sharing ``model.forward`` made decode recompile with symbolic batch sizes
(batch 64 went from 5.6 to 8.2 ms a token).

``CONVEYOR_TORCH_COMPILE=0`` turns compiling off (graphs only), ``CONVEYOR_CUDA_GRAPHS=0`` both. The
first pass of each kind compiles (about 30 s for a 7B model, cached by inductor on disk after). One
``CompiledStage`` is kept per model (``CompiledStage.of``), so compiled code, tile choices and graphs
serve every later generation on that model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch._dynamo
import torch._inductor.config

from conveyor.inference import skinny_matmul
from conveyor.inference.kv_cache import KVCache
from conveyor.inference.model import StageModel

log = logging.getLogger(__name__)


def _flag(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass
class _Captured:
    inputs: torch.Tensor
    positions: torch.Tensor
    output: torch.Tensor
    graph: torch.cuda.CUDAGraph


class CompiledStage:
    """Runs a stage model's passes on a GPU. ``decode(inputs, positions, lane_start, kv_len)``: one token per
    lane, replayed from a CUDA graph; its output is a static buffer, valid until the next call with the
    same shape. ``prompt(...)``: a prefill or a prompt chunk, compiled. Both take the model's arguments
    and run it eagerly where they do not apply (the CPU, graphs or compiling off)."""

    def __init__(self, model: StageModel, enabled: bool | None = None, compile: bool | None = None):
        self.model = model
        self.enabled = (
            _flag("CONVEYOR_CUDA_GRAPHS") if enabled is None else enabled
        ) and torch.cuda.is_available()
        self.compile = self.enabled and (_flag("CONVEYOR_TORCH_COMPILE") if compile is None else compile)
        self._graphs: dict[tuple[int, int, tuple[int, ...], torch.dtype], _Captured] = {}
        self._cache: KVCache | None = None  # the cache the graphs write (setup_cache replaces it)
        self._weights = _weight_storage(model)  # where the graphs read the weights (.to() moves them)
        self._pool: Any = None  # one memory pool shared by every graph of this stage
        self._forward: Any = model
        self._prompt: Any = model
        self._products: list[skinny_matmul.Product] | None = None
        self.uncompiled: set[str] = set()  # "prompt", "decode": what fell back to eager, compile failing
        if self.compile:
            # Shapes are marked static (the batch of a micro-batch never changes); an int that changes
            # between calls (kv_len as sequences grow, lane_start across micro-batches) is recompiled
            # once as a symbol (automatic dynamic shapes), so a long generation compiles twice, not once
            # per KV block. The default limit of 8 would silently fall back to eager.
            # Round where eager rounds (bf16 after each op), so compiled decode gives eager's tokens;
            # the kernels are memory-bound, the extra conversions cost nothing measurable.
            torch._inductor.config.emulate_precision_casts = True
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
            dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 1024)
            self._forward = torch.compile(model.forward)
            # fullgraph: a graph break would start a frame of the model's own code, whose shape history
            # decode shares
            self._prompt = partial(torch.compile(_prompt_pass, dynamic=True, fullgraph=True), model)

    @classmethod
    def of(cls, model: StageModel) -> CompiledStage:
        """The model's own: made on first use and kept on the model (a server generates again and again)."""
        stage = model.__dict__.get("_compiled_stage")
        if stage is None:
            stage = model.__dict__["_compiled_stage"] = cls(model)
        weights = _weight_storage(model)
        if weights != stage._weights:  # moved or cast since the graphs were captured: they read freed memory
            stage._graphs, stage._pool, stage._products, stage._weights = {}, None, None, weights
        return stage

    def prompt(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        lane_start: int = 0,
        prefill: bool = False,
        kv_len: int | None = None,
        lanes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self._prompt is self.model or inputs.device.type != "cuda":
            return self.model(inputs, positions, lane_start, prefill, kv_len, lanes)
        try:
            return self._prompt(inputs, positions, lane_start, prefill, kv_len, lanes)
        except Exception as e:  # as for decode: what inductor cannot compile still runs, uncompiled
            out = self.model(inputs, positions, lane_start, prefill, kv_len, lanes)  # bad input raises here
            log.warning("torch.compile failed (%s: %s); prompts run uncompiled", type(e).__name__, e)
            self._prompt = self.model
            self.uncompiled.add("prompt")
            return out

    def decode(
        self, inputs: torch.Tensor, positions: torch.Tensor, lane_start: int, kv_len: int
    ) -> torch.Tensor:
        if not self.enabled or inputs.device.type != "cuda" or positions.shape[1] != 1:
            return self.model(inputs, positions, lane_start, kv_len=kv_len)
        if self._cache is not self.model.cache:  # a new cache: the graphs write the old one
            self._graphs, self._pool, self._cache = {}, None, self.model.cache
        key = (lane_start, kv_len, tuple(inputs.shape), inputs.dtype)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(inputs, positions, lane_start, kv_len)
        captured.inputs.copy_(inputs)
        captured.positions.copy_(positions)
        captured.graph.replay()
        return captured.output

    def _capture(
        self, inputs: torch.Tensor, positions: torch.Tensor, lane_start: int, kv_len: int
    ) -> _Captured:
        if self._products is None:
            self._products = skinny_matmul.route_linears(self.model)
        skinny_matmul.tune(self._products, inputs.shape[0])
        static_inputs, static_positions = inputs.clone(), positions.clone()
        for t in (static_inputs, static_positions):
            torch._dynamo.mark_static(t)
        args = (static_inputs, static_positions, lane_start, False, kv_len)
        forward = self._forward
        # Re-running a decode step writes the same K/V at the same positions: warming up is idempotent.
        try:
            warm_up(lambda: forward(*args), times=2)
        except Exception as e:  # a model or build inductor cannot compile still runs, uncompiled
            if forward is self.model:
                raise
            log.warning("torch.compile failed (%s: %s); the decode step runs uncompiled", type(e).__name__, e)
            self._forward = forward = self.model
            self.uncompiled.add("decode")
            warm_up(lambda: forward(*args), times=2)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = forward(*args)
        self._pool = graph.pool()
        return _Captured(static_inputs, static_positions, output, graph)


def _weight_storage(model: StageModel) -> list[tuple[int, torch.dtype]]:
    return [(t.data_ptr(), t.dtype) for t in (*model.parameters(), *model.buffers())]


def _prompt_pass(
    model: StageModel,
    inputs: torch.Tensor,
    positions: torch.Tensor,
    lane_start: int,
    prefill: bool,
    kv_len: int | None,
    lanes: torch.Tensor | None,
) -> torch.Tensor:
    return model(inputs, positions, lane_start, prefill, kv_len, lanes)


def warm_up(fn: Callable[[], object], times: int = 1) -> None:
    """Run ``fn`` ``times`` on a side stream, then join it: what a function needs before it is captured
    in a CUDA graph (compilation, the allocator, cuBLAS handles, NCCL communicators)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            fn()
    torch.cuda.current_stream().wait_stream(side)
