"""What a checkpoint must hold for its config, and how a layout splits the model: the checks that need
neither torch nor a byte of the weights.

The launcher's pre-flight runs them on the safetensors headers alone (``HeaderIndex``) before any rank
reads the model; importing torch for them cost the pre-flight seconds (4 s on an H200 machine whose
image ships no bytecode, 6.8 s on a loaded 2-core one). The loader runs the same checks on the files
it opens (loader.py re-exports them).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from conveyor.inference.model.families import Arch, LayerLinear, NameMap


class CheckpointError(ValueError):
    pass


class TensorParallelError(ValueError):
    pass


def check_divisible(arch: Arch, tensor_parallel: int) -> None:
    """Refuse, before any weight is read, a layout whose head or MLP widths do not split evenly."""
    t = tensor_parallel
    if t < 1:
        raise TensorParallelError(f"tensorParallel must be >= 1, got {t}")
    problems = [
        f"{what} {n} is not divisible by tensorParallel {t}"
        for what, n in (
            ("num_attention_heads", arch.heads),
            ("num_key_value_heads", arch.kv_heads),
            ("intermediate size", arch.intermediate),
        )
        if n % t
    ]
    if problems:
        divisors = [
            d
            for d in range(1, arch.heads + 1)
            if arch.heads % d == 0 and arch.kv_heads % d == 0 and arch.intermediate % d == 0
        ]
        raise TensorParallelError(
            f"{arch.family} model cannot be split {t} ways: {'; '.join(problems)}. "
            f"Use a tensorParallel that divides the head counts and the intermediate size (one of {divisors})"
        )


class TensorShapes(Protocol):
    """What the checks read of a checkpoint: its tensor names and their shapes (loader.Checkpoint, or
    the headers alone)."""

    dir: Path

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: its index's, else every ``*.safetensors``."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"no *.safetensors in {model_dir}: save the model with save_pretrained(safe_serialization=True)"
        )
    return files


def read_header(path: Path) -> dict[str, dict[str, object]]:
    """A safetensors file's header: tensor name -> dtype, shape, data offsets (``__metadata__`` left out).
    Raises CheckpointError for a file whose header does not parse or whose tensors run past its end."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        try:
            if not 0 < n <= size - 8:
                raise ValueError("header length past the end")
            header = json.loads(f.read(n))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((int(t["data_offsets"][1]) for t in tensors.values()), default=0)
            for t in tensors.values():
                [int(d) for d in t["shape"]]
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err}): copy it again") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated ({size} bytes; its header lists tensors up to byte {8 + n + end}): copy it again"
        )
    return tensors


class HeaderIndex:
    """A checkpoint's tensor names and shapes from its files' headers: nothing mapped, no torch."""

    def __init__(self, model_dir: Path, headers: Mapping[Path, Mapping[str, Mapping[str, object]]]):
        self.dir = model_dir
        self._shapes = {
            name: tuple(int(d) for d in entry["shape"])  # type: ignore[attr-defined]
            for header in headers.values()
            for name, entry in header.items()
        }
        # BertFor* checkpoints prefix the encoder with "bert."; BertModel ones do not (as Checkpoint).
        self.prefix = "bert." if any(k.startswith("bert.") for k in self._shapes) else ""

    @classmethod
    def read(cls, model_dir: Path) -> HeaderIndex:
        return cls(model_dir, {f: read_header(f) for f in weight_files(model_dir)})

    def names(self) -> set[str]:
        return {k.removeprefix(self.prefix) for k in self._shapes}

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[self.prefix + name]


def _linear_shapes(arch: Arch, lin: LayerLinear, conv1d: bool) -> tuple[int, int]:
    """(out, in) of a HF linear, torch layout."""
    q, kv, h, i = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.hidden, arch.intermediate
    return {
        "q": (q, h),
        "k": (kv, h),
        "v": (kv, h),
        "qkv_heads": (q + 2 * kv, h),
        "qkv_blocks": (q + 2 * kv, h),
        "o": (h, q),
        "gate": (i, h),
        "up": (i, h),
        "down": (h, i),
    }[lin.kind]


def expected_shapes(arch: Arch, names: NameMap) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of the whole model -> its stored shape, from the config alone."""
    h, w = arch.hidden, arch.word_dim
    global_shapes: dict[str, tuple[int, ...]] = {
        "embed": (arch.vocab_size, w),
        "pos_embed": (arch.max_positions + arch.position_offset, h),
        "lm_head": (arch.vocab_size, w),
        "final_norm.weight": (h,),
        "final_norm.bias": (h,),
        "project_in": (h, w),
        "project_out": (w, h),
        "type_embed": (arch.type_vocab_size, h),
        "embed_norm.weight": (h,),
        "embed_norm.bias": (h,),
        "pooler.weight": (h, h),
        "pooler.bias": (h,),
    }
    out: dict[str, tuple[int, ...]] = {}
    for ours, hf_names in names.globals_.items():
        for hf in hf_names:
            out[hf] = global_shapes[ours]
    for layer in range(arch.layers):
        prefix = names.layer_prefix.format(i=layer)
        for lin in names.linears:
            o, i = _linear_shapes(arch, lin, names.conv1d)
            out[f"{prefix}{lin.name}.weight"] = (i, o) if names.conv1d else (o, i)
            if lin.bias:
                out[f"{prefix}{lin.name}.bias"] = (o,)
        for norm in names.norms:
            out[f"{prefix}{norm.name}.weight"] = (h,)
            if arch.norm == "layer":
                out[f"{prefix}{norm.name}.bias"] = (h,)
    return out


def verify_checkpoint(ckpt: TensorShapes, arch: Arch, names: NameMap) -> None:
    expected = expected_shapes(arch, names)
    present = {n for n in ckpt.names() if not n.endswith(names.ignored_suffixes)}
    alternatives = {hf: ours for ours, hfs in names.globals_.items() for hf in hfs}
    problems: list[str] = []
    for ours, hfs in names.globals_.items():
        if not any(hf in present for hf in hfs) and ours not in names.optional:
            problems.append(f"missing {' or '.join(hfs)}")
    missing_layer = sorted(n for n in expected if n not in present and n not in alternatives)
    if missing_layer:
        problems.append(f"missing {len(missing_layer)} layer tensors, e.g. {missing_layer[:4]}")
    unexpected = sorted(present - set(expected))
    if unexpected:
        problems.append(f"unexpected tensors (not in a {arch.family} model of this config): {unexpected[:6]}")
    for name in sorted(present & set(expected)):
        if ckpt.shape(name) != expected[name]:
            problems.append(
                f"{name} has shape {list(ckpt.shape(name))}, config implies {list(expected[name])}"
            )
    if problems:
        raise CheckpointError(f"checkpoint {ckpt.dir} does not match its config.json: " + "; ".join(problems))


def stage_layers(num_layers: int, stages: int, stage: int) -> range:
    """Layers of ``stage``: contiguous, as even as possible (the first stages take one more)."""
    if stages > num_layers:
        raise ValueError(
            f"{stages} pipeline stages but the model has only {num_layers} layers: use fewer stages"
        )
    base, extra = divmod(num_layers, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))
