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


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_rank_loaded_onto_the_gpu_equals_one_loaded_on_the_host(tmp_path, family: str) -> None:
    """load_stage to a GPU reads the files straight into its memory (FileToDevice: threads, pinned
    buffers); the same rank loaded on the host through the memory map has the same values."""
    from conveyor.inference.model.families import load_arch
    from conveyor.inference.model.loader import Shard, load_stage
    from conveyor.testing.tiny import tiny_model

    tiny_model(family, 0).to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    arch = load_arch(tmp_path)
    for dtype in (torch.bfloat16, torch.float32):
        layout = {"stages": 2, "stage": 1, "shard": Shard(1, 2), "dtype": dtype}
        host = dict(load_stage(tmp_path, arch, **layout).named_parameters())
        pinned = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
        gpu = dict(load_stage(tmp_path, arch, device="cuda", **layout).named_parameters())
        # the loader's pinned buffers went back to the system, not to torch's cache of pinned blocks
        assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) <= pinned
        assert set(gpu) == set(host)
        for name, p in host.items():
            assert gpu[name].is_cuda and gpu[name].dtype == dtype and torch.equal(gpu[name].cpu(), p), name
