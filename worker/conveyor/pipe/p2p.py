"""Point-to-point traffic between neighbouring stages: the one module that sends and receives.

What crosses a stage boundary is a tensor or a tuple of tensors. The first time a channel is used the
sender describes it (shape, dtype and whether it needs a gradient, per tensor) and the receiver caches
that, so later micro-batches allocate their buffers without asking. Shape and dtype travel together:
receiving a bf16 activation into a float32 buffer (DeepSpeed's old bug) corrupts data or hangs. Tensors
that need no gradient (masks, int ids, bool flags) pass through and get no gradient back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# Wire codes of the dtypes a stage boundary may carry (index in this list).
_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


class BoundaryError(TypeError):
    """A stage produced something that cannot cross a stage boundary, or changed its shape."""


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    def empty(self, device: torch.device) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=device)


@dataclass(frozen=True)
class BoundaryMeta:
    """What one stage hands the next: the tensors' metadata and whether it was a tuple."""

    tensors: tuple[TensorMeta, ...]
    is_tuple: bool

    @property
    def grad_indices(self) -> list[int]:
        return [i for i, t in enumerate(self.tensors) if t.requires_grad]


def flatten(value: Any, what: str) -> tuple[tuple[torch.Tensor, ...], bool]:
    """(tensors, is_tuple) of a stage's output; anything else is an error naming the culprit."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    for i, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            raise BoundaryError(
                f"{what} item {i} is {type(item).__name__}: only a tensor or a tuple of tensors crosses a stage "
                "boundary (encode other values as tensors)"
            )
        if item.dtype not in _DTYPES:
            raise BoundaryError(
                f"{what} item {i} has dtype {item.dtype}, which cannot cross a stage boundary"
            )
    return items, isinstance(value, (tuple, list))


def unflatten(tensors: Sequence[torch.Tensor], is_tuple: bool) -> Any:
    return tuple(tensors) if is_tuple else tensors[0]


def describe(tensors: Sequence[torch.Tensor], is_tuple: bool) -> BoundaryMeta:
    return BoundaryMeta(
        tuple(
            TensorMeta(tuple(t.shape), t.dtype, bool(t.requires_grad and t.is_floating_point()))
            for t in tensors
        ),
        is_tuple,
    )


def _encode(meta: BoundaryMeta) -> list[int]:
    out = [int(meta.is_tuple), len(meta.tensors)]
    for t in meta.tensors:
        out += [_DTYPES.index(t.dtype), int(t.requires_grad), len(t.shape), *t.shape]
    return out


def _decode(codes: list[int]) -> BoundaryMeta:
    is_tuple, count = bool(codes[0]), codes[1]
    pos, tensors = 2, []
    for _ in range(count):
        dtype, grad, ndim = _DTYPES[codes[pos]], bool(codes[pos + 1]), codes[pos + 2]
        tensors.append(TensorMeta(tuple(codes[pos + 3 : pos + 3 + ndim]), dtype, grad))
        pos += 3 + ndim
    return BoundaryMeta(tuple(tensors), is_tuple)


class P2P:
    """Sends and receives of one rank. ``peer(stage)`` maps a stage of this rank's pipeline to a global
    rank. All ops of one schedule step go out in one ``batch_isend_irecv``."""

    def __init__(self, peer_rank: dict[int, int], device: torch.device):
        self.peer_rank = peer_rank
        self.device = device
        self.wait_seconds = 0.0  # time blocked on neighbours: the pipeline bubble as this rank sees it

    def send_meta(self, stage: int, meta: BoundaryMeta) -> None:
        codes = torch.tensor(_encode(meta), dtype=torch.int64, device=self.device)
        length = torch.tensor([codes.numel()], dtype=torch.int64, device=self.device)
        # blocking: happens once per channel, before the first activation goes out
        dist.send(length, self.peer_rank[stage])
        dist.send(codes, self.peer_rank[stage])

    def recv_meta(self, stage: int) -> BoundaryMeta:
        length = torch.empty(1, dtype=torch.int64, device=self.device)
        dist.recv(length, self.peer_rank[stage])
        codes = torch.empty(int(length.item()), dtype=torch.int64, device=self.device)
        dist.recv(codes, self.peer_rank[stage])
        return _decode(codes.tolist())

    def isend(self, stage: int, tensors: Sequence[torch.Tensor]) -> list[dist.P2POp]:
        return [dist.P2POp(dist.isend, t.contiguous(), self.peer_rank[stage]) for t in tensors]

    def irecv(self, stage: int, buffers: Sequence[torch.Tensor]) -> list[dist.P2POp]:
        return [dist.P2POp(dist.irecv, b, self.peer_rank[stage]) for b in buffers]

    def run(self, ops: list[dist.P2POp]) -> None:
        """Post one step's sends and receives together and wait for all of them: sends and receives
        paired in one batch cannot block each other (see schedule.py)."""
        if not ops:
            return
        started = time.perf_counter()
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        self.wait_seconds += time.perf_counter() - started
