"""Rank functions for the multi-process fine-tuning tests (importable by spawned processes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from conveyor.spec import parse_spec
from conveyor.topology import Layout, Topology
from conveyor.train.finetune import fine_tune


def fine_tune_rank(rank: int, world: int, spec: dict[str, Any], checkpoint_dir: str) -> dict[int, float]:
    parsed = parse_spec(spec)
    p = parsed.parallelism
    topology = Topology(Layout(replicas=p.replicas, stages=p.stages))
    return fine_tune(parsed, topology, torch.device("cpu"), Path(checkpoint_dir)).losses
