"""The one-process model that tests and benchmarks compare parallel and quantized runs with."""

from __future__ import annotations

from pathlib import Path

import torch

from conveyor.inference.model.stage_model import StageModel
from conveyor.inference.pipeline.stage import PipelinePeers
from conveyor.inference.rank_builder import prepare_rank
from conveyor.topology import Layout, Topology


def one_process_rank(
    model_dir: str | Path,
    *,
    lanes: int,
    max_len: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    quantization: str = "none",
    kv_cache_dtype: str = "auto",
) -> tuple[StageModel, PipelinePeers]:
    """``prepare_rank`` of the whole model in this process (one stage, no tensor parallelism); ``device``
    None: the CPU."""
    return prepare_rank(
        str(model_dir),
        Topology(Layout()),
        dtype=dtype,
        device=device or torch.device("cpu"),
        lanes=lanes,
        max_len=max_len,
        quantization=quantization,
        kv_cache_dtype=kv_cache_dtype,
    )
