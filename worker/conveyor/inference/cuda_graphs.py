"""CUDA graphs for the decode step: one graph per (lane range, dtype) shape, replayed every token.

Decode on a 7B model is a few hundred small kernels per token; launched eagerly from Python they cost
more than the HBM reads they do. The stage model's decode forward has static shapes (fixed lanes,
static KV cache, positions as a tensor: see model.py), so it is captured once per lane range and
replayed. Prefill (S > 1) and CPU runs stay eager.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from conveyor.inference.model import StageModel


@dataclass
class _Captured:
    inputs: torch.Tensor
    positions: torch.Tensor
    output: torch.Tensor
    graph: torch.cuda.CUDAGraph


class GraphedDecode:
    """Call like the model: ``(inputs, positions, lane_start) -> output``."""

    def __init__(self, model: StageModel, enabled: bool = True):
        self.model = model
        self.enabled = enabled and torch.cuda.is_available()
        self._graphs: dict[tuple[int, tuple[int, ...], torch.dtype], _Captured] = {}
        self._pool: Any = None  # one memory pool shared by every graph of this stage

    def __call__(self, inputs: torch.Tensor, positions: torch.Tensor, lane_start: int) -> torch.Tensor:
        if not self.enabled or inputs.device.type != "cuda" or positions.shape[1] != 1:
            return self.model(inputs, positions, lane_start)
        key = (lane_start, tuple(inputs.shape), inputs.dtype)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(inputs, positions, lane_start)
        captured.inputs.copy_(inputs)
        captured.positions.copy_(positions)
        captured.graph.replay()
        # why clone: the next replay overwrites the static output while a send may still read it.
        return captured.output.clone()

    def _capture(self, inputs: torch.Tensor, positions: torch.Tensor, lane_start: int) -> _Captured:
        static_inputs, static_positions = inputs.clone(), positions.clone()
        # Warm up on a side stream (allocator, cuBLAS handles, NCCL) before capture, as CUDA graphs need.
        # Re-running a decode step writes the same K/V at the same positions: idempotent.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model(static_inputs, static_positions, lane_start)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.model(static_inputs, static_positions, lane_start)
        self._pool = graph.pool()
        return _Captured(static_inputs, static_positions, output, graph)
