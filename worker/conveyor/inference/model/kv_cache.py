"""A static, preallocated KV cache of one pipeline stage, organised in lanes.

A lane is one row of the cache: the keys and values of one sequence, written at that sequence's own
positions. ``length = max_len + 1``: the last slot is a scratch slot where idle lanes of a decode step
write (their output is discarded), so a decode step always runs over all lanes of a micro-batch with
the same shapes. A query never attends to the scratch slot (its position is below it), and garbage
left beyond a sequence's position is masked until the sequence overwrites it.
"""

from __future__ import annotations

import torch


class KVCache:
    """One tensor per layer (not one stacked tensor): under torch.compile each layer's cache is then a graph
    input that the decode step writes in place; a write into a view of a larger input is functionalised
    into a copy of the whole input (measured: 5 ms per layer on a 7B model)."""

    def __init__(
        self,
        layers: int,
        lanes: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.lanes_total, self.max_len = lanes, max_len
        self.length = max_len + 1
        shape = (lanes, kv_heads, self.length, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]

    @property
    def scratch_position(self) -> int:
        return self.max_len

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole layer [lanes, kv_heads, length, head_dim] (keys, values)."""
        return self.k[layer], self.v[layer]

    def check_lanes(self, start: int, n: int) -> None:
        if start < 0 or start + n > self.lanes_total:
            raise IndexError(f"lanes [{start}, {start + n}) outside the cache's {self.lanes_total} lanes")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
