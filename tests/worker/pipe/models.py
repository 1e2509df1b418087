"""Tiny pipeline models for the tests, their data, and the single-process reference trainer.

Each model exists twice: as the list of layers ``PipelineModule`` (the code under test) splits, and as a
plain ``nn.Sequential`` built here without any of conveyor.pipe, which the reference trains."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from conveyor.pipe import LayerSpec, TiedLayerSpec
from torch import nn

VOCAB, HIDDEN, SEQ, MICRO = 16, 8, 4, 2
# PipelineModule's documented initialisation: layer i from torch.manual_seed(BASE_SEED + i), a tied module
# from the seed of its first index. The plain models follow it, so both start from the same weights.
BASE_SEED = 1234


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


def seeded(index: int, build: Any) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BASE_SEED + index)
        return build()


class TiedOutput(nn.Module):
    """The output projection of the plain tied model: the embedding module itself, so one weight."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return embed_to_logits(self.embedding, x)


def plain_model(model: str) -> nn.Sequential:
    """The unsplit model in plain torch; module i of the Sequential is layer i of ``MODELS[model]``."""
    if model == "tied":
        embedding = seeded(0, lambda: nn.Embedding(VOCAB, HIDDEN))
        blocks = [seeded(i, lambda: Block(HIDDEN)) for i in range(1, 5)]
        return nn.Sequential(embedding, *blocks, TiedOutput(embedding))
    dtype = {"tuple": torch.float32, "tuple_bf16": torch.bfloat16}[model]
    return nn.Sequential(
        seeded(0, lambda: EmbedWithMask(dtype)),
        *[seeded(i, MaskedBlock) for i in range(1, 5)],
        seeded(5, MaskedHead),
    )


# Tied modules are named by key in PipelineModule and by their first index in the plain model.
TIED_FIRST_INDEX = {"embed": 0}


def plain_name(pipeline_name: str) -> str:
    """``layers.3.fc.weight`` -> ``3.fc.weight``; ``tied.embed.weight`` -> ``0.weight``."""
    scope, key, rest = pipeline_name.split(".", 2)
    return f"{TIED_FIRST_INDEX[key] if scope == 'tied' else key}.{rest}"


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


def reference_run(
    model: str, cfg: dict[str, Any], data: list[list[Any]]
) -> tuple[list[float], dict[str, torch.Tensor], list[float]]:
    """Plain torch on a deep copy of the unsplit ``nn.Sequential``: each step averages the loss over all
    of its micro-batches (every replica's), clips with torch's clip_grad_norm_, takes a torch.optim.Adam
    step. Returns (losses, weights by plain name, grad norms)."""
    net = copy.deepcopy(plain_model(model))
    assert cfg["optimizer"]["type"] == "Adam", "the reference knows only the Adam of config()"
    optimizer = torch.optim.Adam(net.parameters(), **cfg["optimizer"]["params"])
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
    # named_parameters names the tied weight once (0.weight), as the pipeline's tied.embed.weight
    return losses, {k: v.detach().clone() for k, v in net.named_parameters()}, norms
