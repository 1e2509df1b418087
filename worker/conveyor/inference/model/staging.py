"""Host-to-GPU copies of a checkpoint's tensors through a few pinned buffers.

A copy from pageable host memory runs at the driver's staging speed: 3.3 GB/s on the H200 machine, so
loading a 7B model's 13.5 GB took 4.1 s of a 21 s warm start. Copied into a pinned buffer first (a
host memcpy that torch spreads over its threads) and from there asynchronously, the transfer overlaps
the next tensor's host copy and runs at the bus's speed. A few fixed buffers, reused in turn, cost one
allocation however many tensors there are (pinning per tensor costs as much as the copy it saves).

Files need no host tensor at all (``FileToDevice``): a checkpoint read through its memory map goes at
one thread's page-fault speed (1.4-1.8 s for those 13.5 GB on the H200 machine, and 2-5 s inside a
starting rank), while ``pread`` into pinned buffers by 8 threads moved them in 0.5 s
(``benchmarks/load.py``).
"""

from __future__ import annotations

import os
import queue
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


class PinnedStaging:
    """``copy(dst, src)``: ``dst`` (on the GPU, contiguous) filled from ``src`` (on the host), returning
    before the transfer ends; ``close()`` waits for every transfer. Use as a context manager."""

    def __init__(self, device: torch.device, chunk_bytes: int = 64 << 20, buffers: int = 3):
        self.device = device
        self._buffers = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(buffers)]
        self._done: list[torch.cuda.Event | None] = [None] * buffers
        self._next = 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if src.dtype != dst.dtype:
            src = src.to(dst.dtype)
        source = src.contiguous().reshape(-1).view(torch.uint8)
        target = dst.view(-1).view(torch.uint8)
        assert source.numel() == target.numel() and dst.is_contiguous()
        chunk = self._buffers[0].numel()
        for start in range(0, source.numel(), chunk):
            n = min(chunk, source.numel() - start)
            i = self._next
            self._next = (i + 1) % len(self._buffers)
            done = self._done[i]
            if done is not None:
                done.synchronize()  # the buffer's previous transfer has left it
            buffer = self._buffers[i][:n]
            buffer.copy_(source[start : start + n])
            target[start : start + n].copy_(buffer, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._done[i] = event

    def close(self) -> None:
        _let_go(self._done, self._buffers)

    def __enter__(self) -> PinnedStaging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FileToDevice:
    """``read(path, offset, out)``: the bytes of ``path`` from ``offset`` into ``out`` (a contiguous
    ``uint8`` tensor), in chunks that several threads ``pread``: on a GPU each into a pinned buffer,
    queued from there on the caller's stream; on the host straight into ``out``. It returns once every
    chunk is read and queued: work the caller queues after it on that stream sees the bytes.
    ``close()`` waits for every transfer. Use as a context manager."""

    def __init__(self, device: torch.device, threads: int = 8, chunk_bytes: int = 16 << 20):
        self.device = torch.device(device)
        self._chunk = chunk_bytes
        self._gpu = self.device.type == "cuda"
        # on a GPU two buffers a thread: one filling from the file while the other's transfer runs
        self._buffers = [
            torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True)
            for _ in range(2 * threads if self._gpu else 0)
        ]
        self._done: list[torch.cuda.Event | None] = [None] * len(self._buffers)
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(self._buffers)):
            self._free.put(i)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="conveyor-load")
        self._files: dict[str, int] = {}

    def read(self, path: str | Path, offset: int, out: torch.Tensor) -> None:
        assert out.dtype == torch.uint8 and out.is_contiguous() and out.device.type == self.device.type
        fd = self._files.get(str(path))
        if fd is None:
            fd = self._files[str(path)] = os.open(path, os.O_RDONLY)
        stream = torch.cuda.current_stream(self.device) if self._gpu else None
        chunks = [
            self._pool.submit(
                self._read_chunk, fd, str(path), offset + start, out[start : start + self._chunk], stream
            )
            for start in range(0, out.numel(), self._chunk)
        ]
        for chunk in chunks:
            chunk.result()  # read and queued, or raised (a short file)

    def _read_chunk(
        self, fd: int, path: str, offset: int, target: torch.Tensor, stream: torch.cuda.Stream | None
    ) -> None:
        if stream is None:
            _pread_into(fd, path, offset, target)
            return
        i = self._free.get()
        try:
            done = self._done[i]
            if done is not None:
                done.synchronize()  # the buffer's previous transfer has left it
            buffer = self._buffers[i][: target.numel()]
            _pread_into(fd, path, offset, buffer)
            with torch.cuda.stream(stream):
                target.copy_(buffer, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            self._done[i] = event
        finally:
            self._free.put(i)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        _let_go(self._done, self._buffers)
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __enter__(self) -> FileToDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _let_go(done: list[torch.cuda.Event | None], buffers: list[torch.Tensor]) -> None:
    """Wait for every transfer out of ``buffers`` (``done``: the last one's event, per buffer), then give
    the buffers back to the system."""
    for event in done:
        if event is not None:
            event.synchronize()
    done[:] = [None] * len(done)
    buffers.clear()
    release_pinned()


def release_pinned() -> None:
    """Give the pinned host memory no tensor holds back to the system. Torch's pinned allocator keeps
    freed blocks for reuse, for the life of the process: a loader's buffers (256 MB a rank, 2 GB in a
    pod of 8) would count against the pod's memory limit for good."""
    empty = getattr(torch._C, "_host_emptyCache", None)  # torch has no public name for it yet
    if empty is not None and torch.cuda.is_available():
        empty()


def _pread_into(fd: int, path: str, offset: int, target: torch.Tensor) -> None:
    """``target`` (host, contiguous uint8) filled from ``fd`` at ``offset``; the GIL is released while the
    kernel copies."""
    view = target.numpy().data
    n, got = target.numel(), 0
    while got < n:
        read = os.preadv(fd, [view[got:]], offset + got)
        if read == 0:
            raise EOFError(f"{path} ends at byte {offset + got}, {n - got} bytes short of a tensor")
        got += read
