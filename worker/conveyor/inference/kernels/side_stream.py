"""Work on a side stream before CUDA graph capture."""

from __future__ import annotations

from collections.abc import Callable

import torch


def warm_up(fn: Callable[[], object], times: int = 1) -> None:
    """Run ``fn`` ``times`` on a side stream, then join it: what a function needs before it is captured
    in a CUDA graph (compilation, the allocator, cuBLAS handles, NCCL communicators)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            fn()
    torch.cuda.current_stream().wait_stream(side)
