"""Small helpers: those that DeepSpeed scripts import from ``deepspeed.utils``, and ``free_port``."""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a local rendezvous (MASTER_PORT) or server. Another process
    may take it before it is bound again: use it at once, for local runs and tests."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RepeatingLoader:
    """Iterate a data loader forever, restarting it when it ends (``train_batch`` pulls exactly
    ``gradient_accumulation_steps`` micro-batches per call, so an epoch boundary must not stop it)."""

    def __init__(self, loader: Iterable[Any]):
        self.loader = loader
        self.data_iter: Iterator[Any] = iter(loader)
        self.epoch = 0

    def __iter__(self) -> RepeatingLoader:
        return self

    def __next__(self) -> Any:
        try:
            return next(self.data_iter)
        except StopIteration:
            self.epoch += 1
            sampler = getattr(self.loader, "sampler", None)
            if sampler is not None and hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)  # a new shuffle each epoch under DistributedSampler
            self.data_iter = iter(self.loader)
            return next(self.data_iter)  # an empty loader ends here instead of looping forever
