"""Export a trained pipeline to a plain HF directory: config.json, the tokenizer's files, safetensors.

Each stage of replica 0 writes its own layers under their HF names (our fused qkv and gate|up split
back, GPT-2's Conv1D layout transposed back: the inverse of the inference loader's reader), as one shard
``model-0000S-of-0000P.safetensors`` (under tensor parallelism tensor rank 0 writes its stage's layers
whole, gathered from the tensor group, vocabulary-parallel embedding and head too); rank 0 writes the index, the config and the tokenizer. Everything
goes into ``DIR.tmp`` first and is renamed to ``DIR`` after every stage has written: a directory at the
export path is always whole. ``from_pretrained(DIR)`` loads it as is, and so does an inference job.
A ``record`` (fine-tuning's: the step and the run it was exported from) goes in as ``conveyor-export.json``
with the rest, so a restart can tell this export from an earlier one at the same path.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Set
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from conveyor.commit_protocol import fsync_dir
from conveyor.inference.model.families import Arch, NameMap, name_map
from conveyor.inference.model.loader import Checkpoint
from conveyor.inference.validate import InputError
from conveyor.pipe.module import PipelineModule
from conveyor.topology import Topology
from conveyor.train.hf_layers import TIED_KEY, Role, layer_module
from conveyor.train.tensor_parallel import gather_block
from conveyor.train.vocab_parallel import gather_rows, vocab_parallel

# What a tokenizer (and generation defaults) may consist of, copied from the model directory as is.
EXPORT_RECORD = "conveyor-export.json"  # what the export was made from (fine-tuning: step and run)


def read_record(target: Path) -> dict[str, Any] | None:
    """An export's record, or None (no export, or one written without a record)."""
    try:
        record = json.loads((target / EXPORT_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def _block_tensors(
    arch: Arch, names: NameMap, layer: int, ours: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors of decoder layer ``layer`` from our Block's parameters (``attn.wqkv.weight``, ...)."""
    prefix = names.layer_prefix.format(i=layer)
    by_kind = {lin.kind: lin for lin in names.linears}
    q_rows, kv_rows = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim

    def linear(name: str, tensor: torch.Tensor, suffix: str) -> tuple[str, torch.Tensor]:
        if names.conv1d and suffix == ".weight":  # GPT-2 stores [in, out]
            tensor = tensor.t()
        return prefix + name + suffix, tensor.contiguous()

    for suffix in (".weight", ".bias"):
        qkv = ours.get("attn.wqkv" + suffix)
        if qkv is not None:
            q, k, v = qkv.split([q_rows, kv_rows, kv_rows])
            if "qkv_heads" in by_kind:  # GPT-NeoX: rows [heads, (q | k | v), head_dim]
                tail = q.shape[1:]
                parts = [t.reshape(arch.heads, 1, arch.head_dim, *tail) for t in (q, k, v)]
                yield linear(by_kind["qkv_heads"].name, torch.cat(parts, 1).reshape(-1, *tail), suffix)
            elif "qkv_blocks" in by_kind:  # GPT-2: q block | k block | v block
                yield linear(by_kind["qkv_blocks"].name, torch.cat([q, k, v]), suffix)
            else:
                for kind, tensor in (("q", q), ("k", k), ("v", v)):
                    yield linear(by_kind[kind].name, tensor, suffix)  # type: ignore[index]
        if "attn.wo" + suffix in ours:
            yield linear(by_kind["o"].name, ours["attn.wo" + suffix], suffix)
        if "mlp.w_in" + suffix in ours:
            w_in = ours["mlp.w_in" + suffix]
            if arch.gated_mlp:
                gate, up = w_in.chunk(2)
                yield linear(by_kind["gate"].name, gate, suffix)
                yield linear(by_kind["up"].name, up, suffix)
            else:
                yield linear(by_kind["up"].name, w_in, suffix)
        if "mlp.w_out" + suffix in ours:
            yield linear(by_kind["down"].name, ours["mlp.w_out" + suffix], suffix)
    for norm in names.norms:
        for suffix in (".weight", ".bias"):
            if f"{norm.ours}{suffix}" in ours:
                yield f"{prefix}{norm.name}{suffix}", ours[f"{norm.ours}{suffix}"]


def hf_state(
    module: PipelineModule,
    roles: list[Role],
    arch: Arch,
    dtype: torch.dtype,
    source: Set[str] = frozenset(),
    whole: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    whole_vocab: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """This stage's weights under their HF names, in ``dtype``, on the CPU. Where a family has two names
    for one tensor (GPT-NeoX's ``embed_out`` or ``lm_head``), the one the ``source`` checkpoint used.
    ``whole``: a decoder layer's parameters -> the whole layer's (the tensor-parallel shards gathered);
    ``whole_vocab``: a vocabulary-parallel embedding or head -> the whole one."""
    rows = whole_vocab or (lambda t: t)
    names = name_map(arch)
    globals_ = {ours: next((n for n in hf if n in source), hf[0]) for ours, hf in names.globals_.items()}
    out: dict[str, torch.Tensor] = {}
    for index in range(module.start, module.stop):
        role = roles[index]
        params = {n: p.detach() for n, p in layer_module(module, roles, index).named_parameters()}
        if role.kind == "embed":
            out[globals_["embed"]] = rows(params["weight"])
        elif role.kind == "head":
            if TIED_KEY not in module.tied:  # tied: HF ties lm_head to the embedding itself
                out[globals_["lm_head"]] = rows(params["weight"])
        elif role.kind == "inputs":
            for ours, key in (("project_in.weight", "project_in"), ("pos_embed.weight", "pos_embed")):
                if ours in params:
                    out[globals_[key]] = params[ours]
        elif role.kind == "outputs":
            for ours, key in (
                ("final_norm.weight", "final_norm.weight"),
                ("final_norm.bias", "final_norm.bias"),
                ("project_out.weight", "project_out"),
            ):
                if ours in params:
                    out[globals_[key]] = params[ours]
        else:
            block = {n.removeprefix("block."): p for n, p in params.items()}
            if whole is not None:
                block = whole(block)
            out.update(_block_tensors(arch, names, role.layer, block))
    return {name: t.to("cpu", dtype).contiguous() for name, t in out.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_export_path(
    target: Path,
    checkpoint_dir: Path,
    model_dir: str | Path,
    dataset: str | None = None,
    field: str = "the export path",
) -> None:
    """The export replaces the directory at its path whole (below): one that is, or holds, the
    checkpoints, the model or the dataset would be deleted with it (the checkpoints: a restart then
    trains again from step 0). InputError (a refusal) naming ``field``."""
    export = Path(target).resolve()
    protected = [
        ("the checkpoints", "spec.checkpoint.path", Path(checkpoint_dir)),
        ("the model", "spec.model.path", Path(model_dir)),
    ]
    if dataset is not None:
        protected.append(("the dataset", "spec.train.dataset", Path(dataset)))
    for what, field_name, path in protected:
        if export == path.resolve() or export in path.resolve().parents:
            raise InputError(
                f"{field} {target} would replace {what} ({field_name} {path}): the export overwrites its "
                "directory whole; use a directory of its own (default: <checkpoint.path>/export)"
            )


def export(
    module: PipelineModule,
    roles: list[Role],
    arch: Arch,
    topology: Topology,
    model_dir: str | Path,
    target: str | Path,
    dtype: torch.dtype = torch.float32,
    record: Mapping[str, Any] | None = None,
) -> Path:
    """Write the model to ``target`` (collective: every rank calls it); returns ``target``."""
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    initialized = dist.is_available() and dist.is_initialized()
    rank = topology.rank
    stages = topology.num_stages
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if initialized:
        dist.barrier()
    weight_map: dict[str, str] = {}
    state: dict[str, torch.Tensor] = {}
    if topology.replica == 0:  # replicas hold the same weights
        whole, whole_vocab = None, None
        if topology.layout.tensor_parallel > 1:
            assert topology.tensor_group is not None, "tensor parallelism needs a process group"
            whole = functools.partial(gather_block, arch=arch, group=topology.tensor_group)
            if vocab_parallel(arch, topology.layout.tensor_parallel):
                whole_vocab = functools.partial(gather_rows, group=topology.tensor_group)
        source = Checkpoint(model_dir)  # its names only (headers)
        try:
            state = hf_state(module, roles, arch, dtype, source.names(), whole, whole_vocab)
        finally:
            source.close()
    if topology.replica == 0 and topology.tp_rank == 0:  # tensor rank 0 writes the gathered layers
        shard = (
            "model.safetensors"
            if stages == 1
            else f"model-{topology.stage + 1:05d}-of-{stages:05d}.safetensors"
        )
        if state:  # a stage holding only the tied head has nothing of its own to write
            save_file(state, str(tmp / shard), metadata={"format": "pt"})
            weight_map = dict.fromkeys(state, shard)
    maps: list[dict[str, str]] = [weight_map]
    if initialized:
        maps = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(maps, weight_map)
    if rank == 0:
        merged = {name: shard for m in maps for name, shard in m.items()}
        if stages > 1:
            index = {"metadata": {}, "weight_map": dict(sorted(merged.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        _write_config(Path(model_dir), tmp, dtype)
        for name in TOKENIZER_FILES:
            if (Path(model_dir) / name).is_file():
                shutil.copy2(Path(model_dir) / name, tmp / name)
        if record is not None:
            (tmp / EXPORT_RECORD).write_text(json.dumps(dict(record)) + "\n")
        for path in tmp.iterdir():  # durable before the rename publishes it
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
        fsync_dir(target.parent)
    if initialized:
        dist.barrier()
    return target


def _write_config(model_dir: Path, out: Path, dtype: torch.dtype) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):  # the weights' dtype now; keep whichever name the config used
        if key in config:
            config[key] = _dtype_name(dtype)
    if "dtype" not in config and "torch_dtype" not in config:
        config["dtype"] = _dtype_name(dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
