"""Tiny pipeline models for the tests, their data, and the single-process reference trainer."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from conveyor.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from conveyor.pipe.config import load_config
from conveyor.pipe.optim import build_optimizer
from conveyor.topology import Layout, Topology
from torch import nn

VOCAB, HIDDEN, SEQ, MICRO = 16, 8, 4, 2


class Block(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


def embed_to_logits(embedding: nn.Embedding, x: torch.Tensor) -> torch.Tensor:
    return x @ embedding.weight.t()  # [B, S, H] @ [H, V] -> [B, S, V]


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))  # (B*S, V)


def tied_layers() -> list[Any]:
    """Embedding and output projection share one weight (first and last stage)."""
    return [
        TiedLayerSpec("embed", nn.Embedding, VOCAB, HIDDEN),
        *[LayerSpec(Block, HIDDEN) for _ in range(4)],
        TiedLayerSpec("embed", nn.Embedding, VOCAB, HIDDEN, forward_fn=embed_to_logits),
    ]


class EmbedWithMask(nn.Module):
    """ids -> (hidden, mask, flag): a float, an int64 and a bool tensor cross every boundary."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = (ids % 5 != 0).long()  # [B, S] int64, no gradient
        flag = ids[:, 0] % 2 == 0  # [B] bool
        return self.embed(ids).to(self.dtype), mask, flag


class MaskedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        hidden, mask, flag = inputs
        update = torch.tanh(self.fc(hidden.float())) * mask.unsqueeze(-1)  # [B, S, H]
        sign = torch.where(flag, 1.0, 0.5)[:, None, None]  # [B, 1, 1]
        return (hidden.float() + sign * update).to(hidden.dtype), mask, flag


class MaskedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.out = nn.Linear(HIDDEN, VOCAB)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden, mask, _ = inputs
        return self.out(hidden.float()) * mask.unsqueeze(-1)  # [B, S, V]


def tuple_layers(dtype: torch.dtype = torch.float32) -> list[Any]:
    return [
        LayerSpec(EmbedWithMask, dtype),
        *[LayerSpec(MaskedBlock) for _ in range(4)],
        LayerSpec(MaskedHead),
    ]


MODELS = {
    "tied": lambda: tied_layers(),
    "tuple": lambda: tuple_layers(torch.float32),
    "tuple_bf16": lambda: tuple_layers(torch.bfloat16),
}


def make_data(steps: int, micro_batches: int, seed: int = 0) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """data[step][k] = (ids, labels) of micro-batch k of that step (all replicas' micro-batches)."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(steps):
        step = []
        for _ in range(micro_batches):
            ids = torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)
            step.append((ids, torch.roll(ids, -1, dims=1)))
        data.append(step)
    return data


def config(
    micro_batches: int, dp: int, schedule: str = "1f1b", clip: float = 0.0, **extra: Any
) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": micro_batches,
        "train_batch_size": MICRO * micro_batches * dp,
        "optimizer": {"type": "Adam", "params": {"lr": 0.05}},
        "gradient_clipping": clip,
        "pipeline": {"schedule": schedule},
        **extra,
    }


def single_stage(model: str) -> PipelineModule:
    return PipelineModule(MODELS[model](), loss_fn=lm_loss, topology=Topology(Layout(), rank=0, world_size=1))


def reference_run(
    model: str, cfg: dict[str, Any], data: list[list[Any]]
) -> tuple[list[float], dict[str, torch.Tensor], list[float]]:
    """Plain torch on the unsplit model: each step averages the loss over all of its micro-batches
    (every replica's), clips with torch's clip_grad_norm_, steps. Returns (losses, weights, grad norms)."""
    net = copy.deepcopy(single_stage(model))
    optimizer = build_optimizer(load_config(cfg).optimizer, net.parameters())  # type: ignore[arg-type]
    losses, norms = [], []
    for step in data:
        total = torch.zeros(())
        for ids, labels in step:
            loss = lm_loss(net(ids), labels)
            (loss / len(step)).backward()
            total += loss.detach()
        norms.append(
            float(torch.nn.utils.clip_grad_norm_(net.parameters(), cfg["gradient_clipping"] or float("inf")))
        )
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(total / len(step)))
    return losses, {k: v.detach().clone() for k, v in net.state_dict().items()}, norms
