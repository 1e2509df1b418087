"""Vocabulary-parallel token embedding, LM head and cross-entropy (Megatron style), for tensorParallel > 1.

Tensor rank r of T holds vocabulary rows [r V/T, (r+1) V/T) of the embedding and of the head, so the
full [tokens, vocab] logits never exist on one rank:

- embedding: each rank looks up the tokens in its rows (zeros for the others'); the all-reduce of the
  parts is the whole lookup (forward), and its backward is the identity (each rank's rows get the
  gradient of the tokens they hold);
- head: column-parallel over the vocabulary (the input's gradient summed over the ranks), its logits left
  split: [n, S, V/T] per rank;
- cross-entropy on the split logits: the max, the sum of exponentials and the target's logit are each
  all-reduced over the tensor group ([tokens] numbers, not [tokens, V]); backward is softmax - one-hot on
  each rank's own columns, with no communication.

Tied embeddings stay one module (a ``VocabParallelEmbedding`` used at both ends, ``logits``). A vocabulary
that T does not divide keeps the embedding and head replicated (as below tensorParallel 2) and the rank
says so; checkpoints and the export hold whole tensors either way (pipe/reshard.py, export.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from conveyor.inference.model.families import Arch
from conveyor.train.tensor_parallel import _CopyToTensorParallel, _ReduceFromTensorParallel


def vocab_parallel(arch: Arch, tensor_parallel: int) -> bool:
    """Whether the embedding and head are split over the vocabulary (T > 1 divides it)."""
    return tensor_parallel > 1 and arch.vocab_size % tensor_parallel == 0


class VocabParallelEmbedding(nn.Embedding):
    """This rank's vocabulary rows [start, start + num_embeddings) of a token embedding."""

    tensor_parallel_sharded = ("weight",)

    def __init__(self, num_embeddings: int, embedding_dim: int, start: int, group: dist.ProcessGroup):
        super().__init__(num_embeddings, embedding_dim)
        self.start, self.group = start, group

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.num_embeddings)  # tokens [n, S]: another rank's rows
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # [n, S, dim]
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        # why: each rank looked up only its rows; the embedding is the sum of the parts
        return _ReduceFromTensorParallel.apply(out, self.group)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The tied head: [n, S, dim] -> this rank's logits [n, S, V/T]."""
        return F.linear(_CopyToTensorParallel.apply(x, self.group), self.weight)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of logits split over the vocabulary ([N, V/T] on each rank)."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, target: torch.Tensor, start: int, group: dist.ProcessGroup
    ) -> torch.Tensor:
        top = logits.max(dim=-1).values
        # why: the softmax's shift must be the same on every rank: the max over the whole vocabulary
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - top.unsqueeze(-1)  # [N, V/T]
        width = logits.shape[-1]
        local = target - start
        mine = (local >= 0) & (local < width)
        local = local.clamp(0, width - 1)
        picked = shifted.gather(1, local.unsqueeze(1)).squeeze(1) * mine
        # why: the target's logit lives on one rank; the sum hands it to all
        dist.all_reduce(picked, group=group)
        exp = shifted.exp()
        total = exp.sum(dim=-1)
        dist.all_reduce(total, group=group)  # why: the softmax's denominator spans every rank's columns
        ctx.save_for_backward(exp.div_(total.unsqueeze(-1)), mine, local)
        return total.log() - picked

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        softmax, mine, local = ctx.saved_tensors
        out = softmax.clone()
        out[torch.arange(out.shape[0], device=out.device), local] -= mine.to(out.dtype)
        return out * grad.unsqueeze(-1), None, None, None


def vocab_parallel_causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, start: int, group: dist.ProcessGroup
) -> torch.Tensor:
    """hf_layers.causal_lm_loss on this rank's logits [n, S, V/T] (vocabulary from ``start``)."""
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].flatten()  # token t predicts label t + 1
    counted = shifted != -100
    per_token = _VocabParallelCrossEntropy.apply(
        logits.float().flatten(0, 1), shifted.masked_fill(~counted, 0), start, group
    )
    return (per_token * counted).sum() / counted.sum()


def gather_rows(local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """A vocabulary-parallel weight whole (collective over the tensor group)."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)  # why: each tensor rank holds its rows
    return torch.cat(parts)
