"""Cutting saved tensor-parallel shards for another tensorParallel (pipe/reshard.py), in one process:
every (saved, loaded) pair of sizes in {1, 2, 4} gives exactly the shard that splitting the whole tensor
at the new size gives, for a fused q | k | v (GQA), a gate | up and a row-parallel weight; a size that does
not divide a segment is refused naming the field."""

from __future__ import annotations

import pytest
import torch
from conveyor.commit_protocol import CheckpointError
from conveyor.pipe.reshard import cut, overlapping
from conveyor.pipe.sharding import ShardLayout

HEAD_DIM = 2
LAYOUTS = {
    "qkv (8 heads, 4 KV heads)": (ShardLayout(0, (8, 4, 4)), (16 * HEAD_DIM, 6)),
    "gate | up": (ShardLayout(0, (1, 1)), (16, 6)),
    "row-parallel": (ShardLayout(1), (6, 8)),
    "bias": (ShardLayout(0, (8, 4, 4)), (16 * HEAD_DIM,)),
}


def split(whole: torch.Tensor, layout: ShardLayout, size: int) -> list[torch.Tensor]:
    """Each rank's shard as the loaders read it: its part of every segment, in order (written apart
    from reshard.cut, from the layout's definition)."""
    total = sum(layout.segments)
    widths = [whole.shape[layout.dim] * s // total for s in layout.segments]
    segments = [seg.chunk(size, layout.dim) for seg in whole.split(widths, layout.dim)]
    return [torch.cat([seg[r] for seg in segments], layout.dim) for r in range(size)]


@pytest.mark.parametrize("what", LAYOUTS)
@pytest.mark.parametrize("saved", [1, 2, 4])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_a_cut_shard_is_the_whole_tensor_split_at_the_new_size(what, saved, size):
    layout, shape = LAYOUTS[what]
    whole = torch.randn(shape)
    old, new = split(whole, layout, saved), split(whole, layout, size)
    for rank in range(size):
        ranks = overlapping(rank, size, saved)
        assert len(ranks) == max(1, saved // size)  # only the saved shards it needs are read
        got = cut([old[s] for s in ranks], ranks.start, saved, layout, rank, size)
        assert torch.equal(got, new[rank]), (rank, list(ranks))


def test_a_size_that_does_not_divide_a_segment_is_refused_naming_the_field():
    layout = ShardLayout(0, (2, 1, 1))  # 2 heads, 1 KV head, of width 2 each
    whole = torch.randn(8, 3)
    with pytest.raises(
        CheckpointError, match=r"spec\.parallelism\.tensorParallel: .*wqkv.*use a tensorParallel"
    ):
        cut(split(whole, layout, 1), 0, 1, layout, 0, 4, "layers.1.block.attn.wqkv.weight")
