"""Host-to-GPU copies through pinned buffers (staging.py) land every byte where a plain copy does."""

from __future__ import annotations

import pytest
import torch
from conveyor.inference.model.staging import PinnedStaging

pytestmark = pytest.mark.gpu


def test_staged_copies_equal_plain_ones_across_chunks_buffers_and_dtypes() -> None:
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    sources = [torch.randn(n, generator=g) for n in (1, 1000, 4096, 4097, 50_000, 3)]
    sources.append(torch.randn(300, 70, generator=g).t())  # not contiguous
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.bfloat16, torch.float32, torch.int64]
    dtypes.append(torch.float32)
    expected = [s.to(d, copy=True) for s, d in zip(sources, dtypes)]
    targets = [torch.empty(s.shape, dtype=d, device=device) for s, d in zip(sources, dtypes)]
    # a small chunk and two buffers: tensors span several chunks, and the buffers are reused many times
    with PinnedStaging(device, chunk_bytes=4096, buffers=2) as staging:
        for target, source in zip(targets, sources):
            staging.copy(target, source)
            source.zero_()  # the host tensor may be reused as soon as copy returns
    for target, want in zip(targets, expected):
        assert torch.equal(target.cpu(), want)
