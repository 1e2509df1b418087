"""The 3-D process layout: data-parallel replicas x pipeline stages x tensor-parallel ranks.

``rank = (replica * stages + stage) * tensor_parallel + tp_rank`` (docs/design.md), so the T ranks of a
stage are adjacent (one pod, NVLink) and a replica's P x T ranks are contiguous (one group, one world
for inference). ``Layout`` is pure arithmetic, checked before any process group exists; ``Topology``
creates the groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class Coord:
    replica: int
    stage: int
    tp: int


@dataclass(frozen=True)
class Layout:
    replicas: int = 1
    stages: int = 1
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        for name in ("replicas", "stages", "tensor_parallel"):
            if getattr(self, name) < 1:
                raise LayoutError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def world_size(self) -> int:
        return self.replicas * self.stages * self.tensor_parallel

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise LayoutError(
                f"world size {world_size} != replicas {self.replicas} x stages {self.stages} x "
                f"tensor_parallel {self.tensor_parallel} = {self.world_size}: launch that many processes "
                "or change the layout"
            )

    def rank(self, replica: int, stage: int, tp: int = 0) -> int:
        return (replica * self.stages + stage) * self.tensor_parallel + tp

    def coord(self, rank: int) -> Coord:
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} outside a world of {self.world_size}")
        group, tp = divmod(rank, self.tensor_parallel)
        replica, stage = divmod(group, self.stages)
        return Coord(replica, stage, tp)

    # The rank sets of each axis; every rank must create every group in the same order.
    def pipe_groups(self) -> list[list[int]]:
        return [
            [self.rank(r, s, t) for s in range(self.stages)]
            for r in range(self.replicas)
            for t in range(self.tensor_parallel)
        ]

    def data_groups(self) -> list[list[int]]:
        return [
            [self.rank(r, s, t) for r in range(self.replicas)]
            for s in range(self.stages)
            for t in range(self.tensor_parallel)
        ]

    def tensor_groups(self) -> list[list[int]]:
        return [
            [self.rank(r, s, t) for t in range(self.tensor_parallel)]
            for r in range(self.replicas)
            for s in range(self.stages)
        ]

    def replica_groups(self) -> list[list[int]]:
        """All P x T ranks of one replica (the model-parallel group)."""
        size = self.stages * self.tensor_parallel
        return [list(range(r * size, (r + 1) * size)) for r in range(self.replicas)]


class Topology:
    """This rank's place in the layout and its process groups (created collectively on construction)."""

    def __init__(self, layout: Layout, rank: int | None = None, world_size: int | None = None):
        self.layout = layout
        initialized = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
        world = world_size if world_size is not None else (dist.get_world_size() if initialized else 1)
        layout.check_world(world)
        self.coord = layout.coord(self.rank)
        self.pipe_group = self._make(layout.pipe_groups()) if initialized else None
        self.data_group = self._make(layout.data_groups()) if initialized else None
        self.tensor_group = self._make(layout.tensor_groups()) if initialized else None
        self.replica_group = self._make(layout.replica_groups()) if initialized else None

    def _make(self, rank_sets: list[list[int]]) -> dist.ProcessGroup | None:
        mine = None
        for ranks in rank_sets:
            group = dist.new_group(ranks)  # collective: every rank creates every group
            if self.rank in ranks:
                mine = group
        return mine

    @property
    def stage(self) -> int:
        return self.coord.stage

    @property
    def num_stages(self) -> int:
        return self.layout.stages

    @property
    def tp_rank(self) -> int:
        return self.coord.tp

    @property
    def replica(self) -> int:
        return self.coord.replica

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.layout.stages - 1

    def stage_rank(self, stage: int) -> int:
        """Global rank of ``stage`` in this rank's pipeline (same replica and tp rank)."""
        return self.layout.rank(self.replica, stage, self.tp_rank)

    @property
    def prev_rank(self) -> int | None:
        return None if self.is_first_stage else self.stage_rank(self.stage - 1)

    @property
    def next_rank(self) -> int | None:
        return None if self.is_last_stage else self.stage_rank(self.stage + 1)

    def __repr__(self) -> str:
        c = self.coord
        return f"Topology(rank={self.rank}, replica={c.replica}, stage={c.stage}, tp={c.tp}, layout={self.layout})"
