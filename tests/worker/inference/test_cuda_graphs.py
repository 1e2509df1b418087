"""CompiledStage's bookkeeping, which runs on the CPU too (its compiling and graphs need CUDA: test_gpu.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from conveyor.inference.cuda_graphs import CompiledStage
from conveyor.testing.reference import one_process_rank
from conveyor.testing.tiny import save_tiny


def test_one_compiled_stage_per_model_whose_graphs_go_when_the_weights_move(tmp_path: Path) -> None:
    model, _ = one_process_rank(save_tiny("llama", tmp_path, tokenizer=False), lanes=2, max_len=16)
    stage = CompiledStage.of(model)
    assert CompiledStage.of(model) is stage
    stage._graphs[(0, 16, (2, 1), torch.int64)] = object()  # type: ignore[assignment] (as if captured)
    CompiledStage.of(model)
    assert stage._graphs, "the same weights keep their graphs"
    model.to(torch.bfloat16)  # new storage: a captured graph would read the freed float32 weights
    assert CompiledStage.of(model) is stage and not stage._graphs
