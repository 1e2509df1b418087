"""Reading checkpoint files straight into a rank's tensors (loader.tensor_spans, staging.FileToDevice,
``Checkpoint(device=...)``), the path a GPU rank loads by, gives exactly what the memory-mapped reads
give: every byte, every row and column slice, every family's fused layout. Run here on the host; the
GPU's pinned-buffer leg is in test_staging.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conveyor.inference.model.families import load_arch
from conveyor.inference.model.loader import Checkpoint, Shard, load_stage, tensor_spans
from conveyor.inference.model.staging import FileToDevice
from conveyor.testing.tiny import tiny_model
from safetensors import safe_open


def _save(family: str, directory: Path, dtype: torch.dtype) -> Path:
    tiny_model(family, 0).to(dtype).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_tensor_lies_where_its_span_says(tmp_path: Path, dtype: torch.dtype) -> None:
    model_dir = _save("llama", tmp_path, dtype)
    (path,) = model_dir.glob("*.safetensors")
    raw = path.read_bytes()
    spans = tensor_spans(path)
    with safe_open(str(path), framework="pt") as f:
        assert set(spans) == set(f.keys())
        for name, span in spans.items():
            want = f.get_tensor(name)
            assert (span.dtype, span.shape) == (want.dtype, tuple(want.shape))
            nbytes = want.numel() * want.element_size()
            got = torch.frombuffer(bytearray(raw[span.offset : span.offset + nbytes]), dtype=torch.uint8)
            assert torch.equal(got.view(span.dtype).view(span.shape), want), name


def test_threads_read_every_chunk_of_a_range_and_a_short_file_is_an_error(tmp_path: Path) -> None:
    data = torch.randint(0, 256, (100_003,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "blob"
    path.write_bytes(data.numpy().tobytes())
    # chunks of 4 KiB over 4 threads: a range spans many chunks, read out of order
    with FileToDevice(torch.device("cpu"), threads=4, chunk_bytes=4096) as reader:
        out = torch.empty(90_001, dtype=torch.uint8)
        reader.read(path, 7_001, out)
        assert torch.equal(out, data[7_001:97_002])
        with pytest.raises(EOFError, match="bytes short"):
            reader.read(path, 50_000, torch.empty(60_000, dtype=torch.uint8))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_direct_reads_equal_mapped_reads_whole_and_sliced(tmp_path: Path, family: str) -> None:
    model_dir = _save(family, tmp_path, torch.bfloat16)
    mapped, direct = Checkpoint(model_dir), Checkpoint(model_dir, device="cpu")
    try:
        for name in sorted(mapped.names()):
            shape = mapped.shape(name)
            assert torch.equal(direct.read(name), mapped.read(name)), name
            rows = (1, max(2, shape[0] - 1))
            assert torch.equal(direct.read(name, 0, *rows), mapped.read(name, 0, *rows)), name
            if len(shape) == 2:
                cols = (1, max(2, shape[1] // 2))
                assert torch.equal(direct.read(name, 1, *cols), mapped.read(name, 1, *cols)), name
    finally:
        mapped.close()
        direct.close()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_a_rank_loaded_by_direct_reads_equals_one_loaded_from_the_map(tmp_path: Path, family: str) -> None:
    model_dir = _save(family, tmp_path, torch.bfloat16)
    arch = load_arch(model_dir)
    for stage, tp_rank in [(0, 0), (1, 1)]:
        layout = {"stages": 2, "stage": stage, "shard": Shard(tp_rank, 2), "dtype": torch.float32}
        want = load_stage(model_dir, arch, **layout)
        got = load_stage(Checkpoint(model_dir, device="cpu"), arch, **layout)
        want_params, got_params = dict(want.named_parameters()), dict(got.named_parameters())
        assert set(got_params) == set(want_params)
        for name, p in want_params.items():
            assert got_params[name].dtype == p.dtype and torch.equal(got_params[name], p), (stage, name)
