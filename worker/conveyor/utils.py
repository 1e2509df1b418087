"""Small helpers that DeepSpeed scripts import from ``deepspeed.utils``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


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
