"""Point-to-point messages between pipeline stages: the only module of generation that sends or receives.

A work item goes as two messages: its metadata (int64 on the host) over a gloo group, and its payload
(hidden states, or sampled tokens back to stage 0) over the default group, NCCL on GPUs. The receiver
reads the metadata on the host without touching a GPU, knows from it the payload's shape, and posts the
payload receive into a buffer of that shape; on NCCL the receive is queued on the device and the host
goes on. So no stage's host waits for a GPU to learn what comes next (a header read back from the GPU
costs a device-to-host sync per message), each stage's host runs ahead of its GPU, and transfers queue
behind compute. The payload's dtype is the stage's compute dtype, the same on every stage (one spec),
and a sender refuses a payload of another dtype: a receive buffer that disagrees with the sender is how
DeepSpeed's pipeline once deadlocked.

Sends are asynchronous (``isend``): a rank never blocks on a send, which would deadlock the ring
stage 0 -> ... -> last -> stage 0 that generation forms. Pending sends are kept alive until done.
Messages between two ranks arrive in the order sent, per group, so an item's metadata and payload pair up.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def meta_group() -> Any:
    """A gloo group of every rank, for the host-side metadata (call on every rank, in the same order)."""
    return dist.new_group(backend="gloo")


class Channel:
    """Sends to and receives from peer ranks (global ranks): metadata over ``meta`` (gloo; None for the
    default group), payloads on ``device`` in ``dtype`` (token replies in int64)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, meta: Any = None):
        self.device, self.dtype, self.meta = device, dtype, meta
        self._pending: list[tuple[Any, torch.Tensor]] = []

    def _keep(self, work: Any, tensor: torch.Tensor) -> None:
        self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]
        self._pending.append((work, tensor))

    def send_meta(self, meta: torch.Tensor, dst: int) -> None:
        meta = meta.to(torch.int64).cpu().contiguous()
        length = torch.tensor([meta.numel()], dtype=torch.int64)
        self._keep(dist.isend(length, dst, group=self.meta), length)
        self._keep(dist.isend(meta, dst, group=self.meta), meta)

    def send_payload(self, payload: torch.Tensor, dst: int) -> None:
        if payload.dtype not in (self.dtype, torch.int64):
            raise TypeError(f"payload of {payload.dtype}; this pipeline sends {self.dtype} (or int64 tokens)")
        payload = payload.to(self.device).contiguous()  # NCCL sends device tensors only
        self._keep(dist.isend(payload, dst), payload)

    def send_item(self, meta: torch.Tensor, payload: torch.Tensor, dst: int) -> None:
        self.send_meta(meta, dst)
        self.send_payload(payload, dst)

    def recv_meta(self, src: int) -> torch.Tensor:
        length = torch.empty(1, dtype=torch.int64)
        dist.recv(length, src, group=self.meta)
        meta = torch.empty(int(length), dtype=torch.int64)
        dist.recv(meta, src, group=self.meta)
        return meta

    def recv_payload(
        self, shape: tuple[int, ...], src: int, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """On NCCL this queues the receive on the device: the host does not wait for the data."""
        payload = torch.empty(shape, dtype=dtype or self.dtype, device=self.device)
        dist.recv(payload, src)
        return payload

    def flush(self) -> None:
        """Wait for every pending send (before exit: an unfinished send would be lost)."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
