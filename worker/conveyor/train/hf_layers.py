"""An HF causal LM as a ``PipelineModule`` layer list, filled from its checkpoint one rank's layers at a time.

The layers are inference/model/stage_model.py's (one decoder ``Block`` for every family, fused qkv and gate|up), so
training and generation run the same code: the token embedding first, then the family's input extras
(OPT's ``project_in``, learned positions), one entry per decoder layer, the final norm (and OPT's
``project_out``), and the LM head last. Tied embeddings are one ``TiedLayerSpec`` used at both ends:
the engine sums its gradient over the stages holding a copy, so the copies stay equal.

``load_weights`` reads only the layers this rank's stage built, through the inference loader (names and
shapes of the whole checkpoint checked against the config first), under tensor parallelism only this
tensor rank's part of each decoder layer's linears (the loader's ``Shard``). ``roles`` says what each global layer
index is, which export.py uses to write the HF names back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from conveyor.inference.model.families import Arch, name_map
from conveyor.inference.model.loader import (
    Checkpoint,
    CheckpointError,
    Shard,
    _global,
    _LayerReader,
    verify_checkpoint,
)
from conveyor.inference.model.stage_model import Block, Norm, Step, local_arch, rope_inv_freq
from conveyor.pipe.module import LayerSpec, PipelineModule, TiedLayerSpec
from conveyor.train.tensor_parallel import ColumnParallelLinear
from conveyor.train.vocab_parallel import VocabParallelEmbedding, vocab_parallel

TIED_KEY = "embed"


@dataclass(frozen=True)
class Role:
    """What one global layer index of the pipeline is: ``kind`` and, for a decoder layer, its HF index."""

    kind: str  # embed | inputs | block | outputs | head
    layer: int = -1


class InputExtras(nn.Module):
    """After the token embedding: OPT's ``project_in`` and learned positions (OPT, GPT-2)."""

    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        if arch.word_dim != arch.hidden:
            self.project_in = nn.Linear(arch.word_dim, arch.hidden, bias=False)
        if arch.positions == "learned":
            self.pos_embed = nn.Embedding(arch.max_positions + arch.position_offset, arch.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.arch
        if a.word_dim != a.hidden:
            x = self.project_in(x)
        if a.positions == "learned":
            positions = torch.arange(x.shape[1], device=x.device) + a.position_offset  # [S]
            x = x + self.pos_embed(positions)
        return x


class DecoderLayer(nn.Module):
    """One ``Block`` over whole sequences from position 0: causal attention, no KV cache."""

    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        self.block = Block(arch)
        self._rope: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def _rope_tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (length, device)
        if key not in self._rope:  # computed as the inference model computes its tables (equal to HF's)
            inv_freq, scaling = rope_inv_freq(self.arch)
            freqs = torch.outer(torch.arange(length, dtype=torch.float), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)  # [S, rotary_dim]
            self._rope = {key: ((emb.cos() * scaling).to(device), (emb.sin() * scaling).to(device))}
        return self._rope[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [n, S, hidden]
        s, device = x.shape[1], x.device
        positions = torch.arange(s, device=device)[None]  # [1, S]
        rope = None
        if self.arch.positions == "rotary":
            cos, sin = self._rope_tables(s, device)
            rope = (cos[None, None].to(x.dtype), sin[None, None].to(x.dtype))  # [1, 1, S, rotary_dim]
        mask = None  # None: causal attention (flash)
        window = self.arch.sliding_window
        if window is not None and s > window:
            key, query = positions[:, None, None, :], positions[:, None, :, None]
            mask = (key <= query) & (key > query - window)  # [1, 1, S, S]
        step = Step(positions, torch.zeros(1, 1, dtype=torch.long, device=device), s, mask, rope)
        return self.block(x, step, None)


class OutputNorm(nn.Module):
    """The final norm (and OPT's ``project_out``) before the LM head."""

    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        if arch.final_norm:
            self.final_norm = Norm(arch, arch.hidden)
        if arch.word_dim != arch.hidden:
            self.project_out = nn.Linear(arch.hidden, arch.word_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.arch.final_norm:
            x = self.final_norm(x)
        if self.arch.word_dim != self.arch.hidden:
            x = self.project_out(x)
        return x


def _embed_tokens(module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return module(tokens)  # tokens [n, S] -> [n, S, word_dim]


def _tied_logits(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    assert isinstance(module, nn.Embedding)
    if isinstance(module, VocabParallelEmbedding):
        return module.logits(x)  # [n, S, word_dim] -> this tensor rank's [n, S, vocab / T]
    return F.linear(x, module.weight)  # [n, S, word_dim] -> [n, S, vocab]: the embedding as the head


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's causal-LM loss: token t predicts label t + 1; -100 labels (padding) are not counted."""
    # logits [n, S, vocab], labels [n, S]
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=-100)


def pipeline_layers(
    arch: Arch, tensor_parallel: int = 1, tp_rank: int = 0, group: Any = None
) -> tuple[list[Any], list[Role]]:
    """The layer list of ``arch`` for ``PipelineModule`` and the role of each index; the decoder layers
    with one tensor rank's widths (``local_arch``) when ``tensor_parallel`` > 1 (then
    tensor_parallel.parallelize makes their linears parallel), and with the tensor ``group`` the
    embedding and head split over the vocabulary (vocab_parallel.py) where ``tensor_parallel`` divides it."""
    if not arch.causal:
        raise CheckpointError(f"{arch.family} is not a causal LM: only causal LMs can be fine-tuned")
    layers: list[Any] = []
    roles: list[Role] = []
    embedding: tuple[Any, ...] = (nn.Embedding, arch.vocab_size, arch.word_dim)
    head: tuple[Any, ...] = (nn.Linear, arch.word_dim, arch.vocab_size)
    if group is not None and vocab_parallel(arch, tensor_parallel):
        rows = arch.vocab_size // tensor_parallel
        embedding = (VocabParallelEmbedding, rows, arch.word_dim, tp_rank * rows, group)
        head = (ColumnParallelLinear, arch.word_dim, rows)
    if arch.tie_embeddings:
        layers.append(TiedLayerSpec(TIED_KEY, *embedding, forward_fn=_embed_tokens))
    else:
        layers.append(LayerSpec(*embedding))
    roles.append(Role("embed"))
    if arch.word_dim != arch.hidden or arch.positions == "learned":
        layers.append(LayerSpec(InputExtras, arch))
        roles.append(Role("inputs"))
    block_arch = local_arch(arch, tensor_parallel) if tensor_parallel > 1 else arch
    for i in range(arch.layers):
        layers.append(LayerSpec(DecoderLayer, block_arch))
        roles.append(Role("block", i))
    if arch.final_norm or arch.word_dim != arch.hidden:
        layers.append(LayerSpec(OutputNorm, arch))
        roles.append(Role("outputs"))
    if arch.tie_embeddings:
        layers.append(TiedLayerSpec(TIED_KEY, *embedding, forward_fn=_tied_logits))
    elif head[0] is ColumnParallelLinear:
        layers.append(LayerSpec(*head, bias=False, group=group))
    else:
        layers.append(LayerSpec(*head, bias=False))
    roles.append(Role("head"))
    return layers, roles


def layer_module(module: PipelineModule, roles: list[Role], index: int) -> nn.Module:
    """The module this stage built for global layer ``index`` (the shared one for a tied layer)."""
    if roles[index].kind in ("embed", "head") and TIED_KEY in module.tied:
        return module.tied[TIED_KEY]
    return module.layers[str(index)]


def _hf_tensors(ckpt: Checkpoint, arch: Arch, role: Role, shard: Shard) -> list[tuple[str, torch.Tensor]]:
    """(our parameter name inside the layer's module, tensor) of one layer, read from the checkpoint (a
    decoder layer's linears: only ``shard``'s part)."""
    names = name_map(arch)

    def one(ours: str) -> torch.Tensor:
        found = _global(ckpt, names, ours)
        if found is None and ours == "lm_head" and arch.tie_embeddings:
            found = _global(ckpt, names, "embed")
        if found is None:
            raise CheckpointError(f"{ckpt.dir}: no tensor for {ours} ({names.globals_.get(ours)})")
        return found

    def vocab_rows(ours: str) -> torch.Tensor:  # this tensor rank's rows only, when split
        if not vocab_parallel(arch, shard.tensor_parallel):
            return one(ours)
        rows = arch.vocab_size // shard.tensor_parallel
        start = shard.tp_rank * rows
        for hf in names.globals_.get(ours, ()):
            if ckpt.has(hf):
                return ckpt.read(hf, 0, start, start + rows)
        return one(ours)  # says which names it looked for

    if role.kind == "embed":
        return [("weight", vocab_rows("embed"))]
    if role.kind == "head":
        return [("weight", vocab_rows("embed" if arch.tie_embeddings else "lm_head"))]
    if role.kind == "inputs":
        out = []
        if arch.word_dim != arch.hidden:
            out.append(("project_in.weight", one("project_in")))
        if arch.positions == "learned":
            out.append(("pos_embed.weight", one("pos_embed")))
        return out
    if role.kind == "outputs":
        out = []
        if arch.final_norm:
            out.append(("final_norm.weight", one("final_norm.weight")))
            if arch.norm == "layer":
                out.append(("final_norm.bias", one("final_norm.bias")))
        if arch.word_dim != arch.hidden:
            out.append(("project_out.weight", one("project_out")))
        return out
    prefix = names.layer_prefix.format(i=role.layer)
    reader = _LayerReader(ckpt, arch, names, shard, prefix, bias_on_rank0=False)
    return [(f"block.{ours}", tensor) for ours, tensor in reader.tensors()]


def load_weights(
    module: PipelineModule, roles: list[Role], model_dir: str | Path, arch: Arch, shard: Shard | None = None
) -> None:
    """Fill this stage's layers from the HF checkpoint (only their tensors, and of the decoder layers'
    linears only ``shard``'s part, are read); every parameter of the stage must be loaded, with the
    shape the model expects."""
    shard = shard or Shard()
    first = next(module.parameters(), None)
    # onto a GPU, the files are read straight into its memory (loader.Checkpoint), not copied from the host
    ckpt = Checkpoint(model_dir, device=first.device if first is not None and first.is_cuda else None)
    loaded: set[int] = set()
    try:
        verify_checkpoint(ckpt, arch, name_map(arch))
        for index in range(module.start, module.stop):
            target = layer_module(module, roles, index)
            params = dict(target.named_parameters())
            for ours, tensor in _hf_tensors(ckpt, arch, roles[index], shard):
                param = params[ours]
                if tuple(tensor.shape) != tuple(param.shape):
                    raise CheckpointError(
                        f"layer {index} ({roles[index].kind}) {ours}: checkpoint shape {list(tensor.shape)}, "
                        f"model {list(param.shape)}"
                    )
                with torch.no_grad():
                    param.copy_(tensor.to(param.dtype))
                loaded.add(id(param))
    finally:
        ckpt.close()
    left = [name for name, p in module.named_parameters() if id(p) not in loaded]
    if left:
        raise CheckpointError(f"parameters not loaded from {model_dir}: {left[:6]}")


def parameter_count(arch: Arch) -> int:
    """Parameters of the whole model (a tied weight once), counted on the meta device: MFU's N."""
    layers, _ = pipeline_layers(arch)
    tied: set[str] = set()
    total = 0
    for spec in layers:
        if isinstance(spec, TiedLayerSpec):
            if spec.key in tied:
                continue
            tied.add(spec.key)
        with torch.device("meta"):
            total += sum(p.numel() for p in spec.build().parameters())
    return total
