"""Tensor-parallel forward passes of BERT-style encoders, and sentence embeddings from them
(mean pooling over real tokens, then L2 normalisation, as sentence-transformers' all-MiniLM models do)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from conveyor.inference.model.families import ENCODER_FAMILIES, load_arch
from conveyor.inference.model.loader import Shard, load_stage
from conveyor.inference.model.stage_model import StageModel
from conveyor.inference.pipeline.tensor_parallel import Policy, add_all_reduce_hooks


def load_encoder(
    model_dir: str | Path,
    *,
    shard: Shard | None = None,
    tensor_group: Any = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    policy: Policy | None = None,
) -> StageModel:
    shard = shard or Shard()
    arch = load_arch(model_dir)
    if arch.family not in ENCODER_FAMILIES:
        raise ValueError(
            f"{model_dir} is a {arch.family} model; encoders supported: {', '.join(ENCODER_FAMILIES)}"
        )
    model = load_stage(model_dir, arch, shard=shard, dtype=dtype, device=device, policy=policy)
    if shard.tensor_parallel > 1:
        add_all_reduce_hooks(model, tensor_group)
    return model


@torch.inference_mode()
def sentence_embeddings(
    model: StageModel, tokens: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """tokens, attention_mask [n, S] -> unit-length embeddings [n, hidden] (mean over real tokens)."""
    hidden = model.encode(tokens, attention_mask)  # [n, S, hidden]
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [n, S, 1]
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=1)
