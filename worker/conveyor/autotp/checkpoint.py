"""Fill a model sharded on the meta device from safetensors files, each rank reading only its slices.

DeepSpeed's ``init_inference(model_on_meta, checkpoint=...)``: the model is built with no storage
(``with torch.device("meta"): AutoModelForCausalLM.from_config(config)``), traced and sharded there
(plan.py, shard.py: no byte moves), and the ``ShardLedger`` says which full tensor each remaining
parameter is a slice of. Each parameter is then read with ``safe_open(...).get_slice``, one contiguous run
of its split dimension at a time, so a rank never holds a full copy of a split weight; tied weights are one
parameter and read once. MoE experts that transformers fuses on load from per-expert checkpoint tensors
are read through the same rules, run by run from each expert's tensor (sources.py). Buffers the checkpoint does not hold (rotary ``inv_freq``, ``position_ids``) are
computed by transformers' own ``initialize_weights``, which skips every tensor marked as loaded.

``checkpoint`` is an HF model directory, a list of ``.safetensors`` files, a ``.safetensors`` file, an HF
``model.safetensors.index.json``, or a DeepSpeed checkpoint json (``{"checkpoints": [...]}``; relative
names against ``base_dir`` or the json's directory).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from conveyor.autotp.plan import AutoTPError
from conveyor.autotp.shard import ShardLedger, replace_param
from conveyor.autotp.sources import SafetensorsFiles, Source, Stored, converted_sources


def checkpoint_files(checkpoint: str | Path | Sequence[str | Path]) -> list[Path]:
    """The safetensors files ``checkpoint`` names; ``AutoTPError`` naming what is wrong with it."""
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint)
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            if index.is_file():
                return checkpoint_files(index)
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise AutoTPError(
                    f"checkpoint={str(path)!r} holds no *.safetensors file: save the model with "
                    "save_pretrained(..., safe_serialization=True)"
                )
            return files
        if path.suffix == ".json" and path.is_file():
            data = json.loads(path.read_text())
            if "weight_map" in data:  # HF index
                names = sorted(set(data["weight_map"].values()))
                base = path.parent
            elif "checkpoints" in data:  # DeepSpeed's checkpoint json
                names = list(data["checkpoints"])
                base = Path(data.get("base_dir") or path.parent)
            else:
                raise AutoTPError(
                    f"checkpoint json {str(path)!r} has neither 'weight_map' (an HF index) nor 'checkpoints' "
                    "(DeepSpeed's list of files)"
                )
            return checkpoint_files([base / n for n in names])
        checkpoint = [path]
    files = [Path(f) for f in checkpoint]
    if not files:
        raise AutoTPError("checkpoint= is an empty list: name the model's .safetensors files")
    problems = [f"{f} does not exist" for f in files if not f.is_file()]
    problems += [
        f"{f} is not a .safetensors file (convert .bin/.pt checkpoints with save_pretrained)"
        for f in files
        if f.suffix != ".safetensors"
    ]
    if problems:
        raise AutoTPError("checkpoint= " + "; ".join(problems))
    return files


@dataclass
class LoadReport:
    """What one rank read: bytes per parameter name (as read from the files), the parameter bytes it
    ended with, the most parameter bytes it held at any moment while loading (materialized parameters
    plus the slice in hand), and the bytes of the full checkpoint tensors its parameters come from."""

    read_bytes: dict[str, int] = field(default_factory=dict)
    full_bytes: dict[str, int] = field(default_factory=dict)
    sliced: set[str] = field(default_factory=set)  # checkpoint names this rank keeps a slice of
    param_bytes: int = 0
    peak_bytes: int = 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _key(names: list[str], keys: set[str], prefix: str) -> str | None:
    """The checkpoint key of a parameter known by ``names`` (tied weights have several), with or
    without the base model's prefix (a base-model checkpoint under a head class, or the reverse)."""
    for name in names:
        for cand in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
            if cand in keys:
                return cand
    return None


def load_sharded_checkpoint(
    model: nn.Module,
    ledger: ShardLedger,
    files: list[Path],
    *,
    dtype: torch.dtype | None,
    device: torch.device,
) -> LoadReport:
    """Materialize every parameter of the sharded ``model`` from ``files`` (slices only), then its buffers."""
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    ckpt = SafetensorsFiles(files)
    report = LoadReport()
    try:
        catalog: dict[str, Source] = {k: ckpt.stored(k) for k in ckpt.names()}
        assembled, unreadable = converted_sources(model, ckpt)
        for name, src in assembled.items():
            catalog.setdefault(name, src)  # a tensor stored under the parameter's own name wins
        keys = set(catalog)
        missing = [ns[0] for pid, ns in names.items() if _key(ns, keys, prefix) is None]
        if missing:
            why = [
                f"{n}: {unreadable[k]}"
                for n in missing
                for k in (n, n.removeprefix(prefix + "."))
                if k in unreadable
            ]
            raise AutoTPError(
                f"checkpoint {[str(f) for f in files][:3]} has no tensor for {len(missing)} parameters of "
                f"{type(model).__name__}, e.g. {missing[:5]}: is it this model's checkpoint?"
                + (f" ({'; '.join(why[:3])})" if why else "")
            )
        for pid, p in params.items():
            key = _key(names[pid], keys, prefix)
            assert key is not None
            src = catalog[key]
            root, ops = ledger.origin(p)
            if tuple(src.shape) != tuple(root.shape):
                where = key if isinstance(src, Stored) else f"{key} (assembled from {src.describe()})"
                raise AutoTPError(
                    f"checkpoint tensor {where} has shape {list(src.shape)}, the model's "
                    f"{names[pid][0]} {list(root.shape)}"
                )
            target = dtype or p.dtype
            if ops:
                report.sliced.add(key)
            report.full_bytes[key] = root.numel() * torch.empty((), dtype=target).element_size()
            if ledger.is_zeroed(p):  # a row-parallel bias past rank 0: added once, by rank 0
                value = torch.zeros(p.shape, dtype=target, device=device)
                report.read_bytes[key] = 0
                held = _nbytes(value)
            else:
                before = ckpt.read_bytes
                value = ckpt.read(src, *(ops[0] if ops else (None, None)))
                beside = ckpt.beside  # one run in hand while a slice is assembled from several
                for dim, index in ops[1:]:  # a slice of a slice: narrowed further in memory
                    value = value.index_select(dim, index)
                report.read_bytes[key] = ckpt.read_bytes - before
                converted = value.to(device=device, dtype=target)
                held = _nbytes(value) + max(beside, _nbytes(converted) if converted is not value else 0)
                value = converted
            report.peak_bytes = max(report.peak_bytes, report.param_bytes + held)
            new = nn.Parameter(value.contiguous(), requires_grad=False)
            new._is_hf_initialized = True  # type: ignore[attr-defined]  # transformers' init skips it
            replace_param(model, p, new)
            report.param_bytes += _nbytes(new)
        _load_buffers(model, ckpt, catalog, prefix, device)
    finally:
        ckpt.close()
    return report


def _load_buffers(
    model: nn.Module, ckpt: SafetensorsFiles, catalog: dict[str, Source], prefix: str, device: torch.device
) -> None:
    """Persistent buffers from the checkpoint where it has them; the rest computed by transformers'
    ``initialize_weights`` (which recomputes rotary tables and position ids from the config)."""
    for name, buf in list(model.named_buffers()):
        module_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(module_name)
        key = _key([name], set(catalog), prefix)
        if key is not None and tuple(catalog[key].shape) == tuple(buf.shape):
            value = ckpt.read(catalog[key]).to(device=device, dtype=buf.dtype)
            value._is_hf_initialized = True  # type: ignore[attr-defined]
        elif buf.is_meta:
            value = torch.empty_like(buf, device=device)
        else:
            continue
        owner._buffers[attr] = value
    initialize = getattr(model, "initialize_weights", None)
    if callable(initialize):
        initialize()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise AutoTPError(f"after loading the checkpoint, still on the meta device: {left[:5]}")
