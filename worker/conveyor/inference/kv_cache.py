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
        shape = (layers, lanes, kv_heads, self.length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def scratch_position(self) -> int:
        return self.max_len

    def lanes(self, layer: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [n, kv_heads, length, head_dim] of lanes [start, start + n) of one layer (no copy)."""
        if start < 0 or start + n > self.lanes_total:
            raise IndexError(f"lanes [{start}, {start + n}) outside the cache's {self.lanes_total} lanes")
        return self.k[layer, start : start + n], self.v[layer, start : start + n]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
