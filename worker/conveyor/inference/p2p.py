"""Point-to-point messages between pipeline stages: the only module that sends or receives.

A message is a list of tensors; each goes as a small int64 header (dtype code, rank, shape) followed by
its payload, so the receiver allocates the right buffer whatever the sender's dtype and shape (a
receive buffer that ignores the sender's dtype is how DeepSpeed's pipeline once deadlocked).

Sends are asynchronous (``isend``): a rank never blocks on a send, which would deadlock the ring
stage 0 -> ... -> last -> stage 0 that generation forms. Pending sends are kept alive until done.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool, torch.uint8)
_MAX_DIMS = 4
_HEADER = 2 + _MAX_DIMS  # dtype code, ndim, shape padded


class Channel:
    """Sends to and receives from peer ranks (global ranks) with tensors on ``device``."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pending: list[tuple[Any, torch.Tensor]] = []

    def send(self, tensors: list[torch.Tensor], dst: int) -> None:
        self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]
        for tensor in tensors:
            if tensor.dim() > _MAX_DIMS:
                raise ValueError(f"p2p tensors have at most {_MAX_DIMS} dims, got shape {list(tensor.shape)}")
            header = torch.zeros(_HEADER, dtype=torch.int64)
            header[0], header[1] = _DTYPES.index(tensor.dtype), tensor.dim()
            header[2 : 2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
            header = header.to(self.device)
            payload = tensor.contiguous()
            self._pending.append((dist.isend(header, dst), header))
            self._pending.append((dist.isend(payload, dst), payload))

    def recv(self, count: int, src: int) -> list[torch.Tensor]:
        out = []
        for _ in range(count):
            header = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
            dist.recv(header, src)
            code, ndim, *shape = header.tolist()
            tensor = torch.empty(shape[:ndim], dtype=_DTYPES[code], device=self.device)
            dist.recv(tensor, src)
            out.append(tensor)
        return out

    def flush(self) -> None:
        """Wait for every pending send (before exit: an unfinished send would be lost)."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
