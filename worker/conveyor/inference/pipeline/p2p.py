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

How a pending send is let go depends on the backend. An NCCL send reports ``is_completed()``; the oldest
are dropped as they complete. A gloo send never does: its ``is_completed()`` stays False until someone
calls ``wait()``, even long after the receiver has the data (measured with torch 2.11). Kept in one list
rescanned on every send, gloo sends made the list, and each send's cost, grow with the run (a 120-prompt
CPU job slowed 10x). So gloo sends go to a reaper thread that waits on them in order: the sending thread
still never blocks, and each send is let go as soon as it is received. (NCCL sends are never waited on
from another thread: there ``wait()`` makes that thread's current CUDA stream wait.)
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Any

import torch
import torch.distributed as dist


def meta_group() -> Any:
    """A gloo group of every rank, for the host-side metadata (call on every rank, in the same order)."""
    return dist.new_group(backend="gloo")


def _is_gloo(group: Any) -> bool:
    """Whether sends on ``group`` (None: the default group) go over gloo (one process: no sends)."""
    return dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "gloo"


class _Reaper:
    """Waits, on its own thread and in order, for sends that never report completion (gloo)."""

    def __init__(self) -> None:
        self._works: queue.SimpleQueue[tuple[Any, torch.Tensor] | None] = queue.SimpleQueue()
        self._outstanding = 0  # put minus waited; read without the lock by backlog() (a hint only)
        self._lock = threading.Condition()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="p2p-reaper", daemon=True)
        self._thread.start()

    def put(self, work: Any, tensor: torch.Tensor) -> None:
        with self._lock:
            self._outstanding += 1
        self._works.put((work, tensor))  # the tensor lives until its send is done

    def _run(self) -> None:
        while (item := self._works.get()) is not None:
            try:
                item[0].wait()
            except BaseException as err:  # a peer died: flush() reports it; the rank fails there
                self.error = self.error or err
            with self._lock:
                self._outstanding -= 1
                self._lock.notify_all()

    def backlog(self) -> int:
        return self._outstanding

    def drain(self) -> None:
        with self._lock:
            self._lock.wait_for(lambda: self._outstanding == 0)
        if self.error is not None:
            raise self.error


class Channel:
    """Sends to and receives from peer ranks (global ranks): metadata over ``meta`` (gloo; None for the
    default group), payloads on ``device`` in ``dtype`` (token replies in int64)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, meta: Any = None):
        self.device, self.dtype, self.meta = device, dtype, meta
        self._pending: deque[tuple[Any, torch.Tensor]] = deque()  # sends that report completion
        self._reaper = _Reaper()
        self._meta_gloo = _is_gloo(meta)
        self._payload_gloo = _is_gloo(None)

    def _keep(self, work: Any, tensor: torch.Tensor, gloo: bool) -> None:
        if gloo:
            self._reaper.put(work, tensor)
            return
        while self._pending and self._pending[0][0].is_completed():  # oldest first: O(1) a send
            self._pending.popleft()
        self._pending.append((work, tensor))

    def backlog(self) -> int:
        """Sends not yet known to be done (bounded by what the receivers have yet to take)."""
        return len(self._pending) + self._reaper.backlog()

    def send_meta(self, meta: torch.Tensor, dst: int) -> None:
        meta = meta.to(torch.int64).cpu().contiguous()
        length = torch.tensor([meta.numel()], dtype=torch.int64)
        self._keep(dist.isend(length, dst, group=self.meta), length, self._meta_gloo)
        self._keep(dist.isend(meta, dst, group=self.meta), meta, self._meta_gloo)

    def send_payload(self, payload: torch.Tensor, dst: int) -> None:
        if payload.dtype not in (self.dtype, torch.int64):
            raise TypeError(f"payload of {payload.dtype}; this pipeline sends {self.dtype} (or int64 tokens)")
        payload = payload.to(self.device).contiguous()  # NCCL sends device tensors only
        self._keep(dist.isend(payload, dst), payload, self._payload_gloo)

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
        self._reaper.drain()
