"""Which indices of one dimension of a weight each tensor-parallel rank keeps."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Split:
    """Which indices of one dimension each rank keeps: the dimension is ``groups`` repeats of a group made
    of ``blocks`` (fused q | k | v are three blocks), and every block is cut into TP equal contiguous
    pieces, so rank r keeps piece r of each."""

    blocks: tuple[int, ...]
    groups: int = 1

    def index(self, rank: int, tp: int) -> torch.Tensor:
        pieces = []
        offset = 0
        for _ in range(self.groups):
            for width in self.blocks:
                size = width // tp
                pieces.append(torch.arange(offset + rank * size, offset + (rank + 1) * size))
                offset += width
        return torch.cat(pieces)
