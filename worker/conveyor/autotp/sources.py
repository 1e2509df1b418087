"""Where each parameter of a model lives in its safetensors files, and reading a slice of it from there.

Most parameters are one tensor under their own name. MoE families are the exception: transformers 5.x
fuses every expert into 3D parameters (``experts.gate_up_proj`` [experts, 2 x inner, hidden],
``experts.down_proj`` [experts, hidden, inner]) while their checkpoints, including what ``save_pretrained``
writes by default, keep one 2D tensor per expert and projection (Mixtral's
``block_sparse_moe.experts.N.w1.weight``, Qwen2-MoE's ``mlp.experts.N.gate_proj.weight``); transformers
converts on load with the rules of ``transformers.conversion_mapping``. We read those same rules (renames,
``MergeModulelist`` = stack the experts, ``Concatenate`` = join gate and up) as a tree of ``Joined`` parts
over ``Stored`` tensors, and read a rank's slice through the tree: each stored tensor contributes only the
run of rows or columns the slice needs, copied into the slice's buffer, so the fused parameter never
exists whole. A checkpoint saved already fused (``save_pretrained(..., save_original_format=False)``) is
read by name like any other tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from torch import nn

from conveyor.inference.model.loader import open_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stored:
    """One tensor of the files."""

    key: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Joined:
    """``parts`` joined along ``dim``: stacked (each part is one entry of a new ``dim``, ``torch.stack``)
    or concatenated (``torch.cat``)."""

    parts: tuple[Source, ...]
    dim: int
    stack: bool

    @property
    def shape(self) -> tuple[int, ...]:
        first = list(self.parts[0].shape)
        if self.stack:
            return (*first[: self.dim], len(self.parts), *first[self.dim :])
        first[self.dim] = sum(p.shape[self.dim] for p in self.parts)
        return tuple(first)

    def describe(self) -> str:
        leaves = list(_leaves(self))
        return f"{len(leaves)} tensors ({leaves[0].key}, ...)"


Source = Union[Stored, Joined]  # noqa: UP007 (a runtime alias used in the dataclass above)


def _leaves(src: Source) -> Iterable[Stored]:
    if isinstance(src, Stored):
        yield src
    else:
        for p in src.parts:
            yield from _leaves(p)


def runs(index: torch.Tensor) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive values in ``index`` (a Split's pieces), in order."""
    found: list[tuple[int, int]] = []
    for i in index.tolist():
        if found and found[-1][1] == i:
            found[-1] = (found[-1][0], i + 1)
        else:
            found.append((i, i + 1))
    return found


class SafetensorsFiles:
    """The tensors of a set of safetensors files, opened lazily: headers only until a slice is read.
    ``read_bytes`` counts what came off the files."""

    def __init__(self, files: list[Path]):
        self._stack = ExitStack()
        self._handles = open_tensors(files, self._stack)
        self.read_bytes = 0
        self.beside = 0  # bytes held beside the last read's result at its worst moment (one run)

    def close(self) -> None:
        self._stack.close()

    def names(self) -> set[str]:
        return set(self._handles)

    def stored(self, key: str) -> Stored:
        return Stored(key, tuple(self._handles[key].get_slice(key).get_shape()))

    def _get(self, key: str, where: slice | tuple[slice, ...]) -> torch.Tensor:
        value = self._handles[key].get_slice(key)[where]
        self.read_bytes += value.numel() * value.element_size()
        return value

    def dtype(self, src: Source) -> torch.dtype:
        first = next(iter(_leaves(src)))
        return self._handles[first.key].get_slice(first.key)[0:0].dtype  # an empty read: its dtype only

    def read(self, src: Source, dim: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """``src`` whole, or the entries ``index`` of its dimension ``dim``. One stored tensor read in one
        run comes back as read; anything else is assembled run by run into one buffer of the result's
        shape (no concatenation: never more than the result plus one run in hand)."""
        self.beside = 0
        if isinstance(src, Stored) and (dim is None or index is None or len(runs(index)) == 1):
            lead = (slice(None),) * (dim or 0)
            where = (*lead, slice(*runs(index)[0])) if dim is not None and index is not None else slice(None)
            return self._get(src.key, where)
        shape = list(src.shape)
        if dim is not None and index is not None:
            shape[dim] = len(index)
        out = torch.empty(shape, dtype=self.dtype(src))
        self._fill(src, dim, index, out)
        return out

    def _copy(self, key: str, where: slice | tuple[slice, ...], out: torch.Tensor) -> None:
        run = self._get(key, where)
        self.beside = max(self.beside, run.numel() * run.element_size())
        out.copy_(run)

    def _fill(self, src: Source, dim: int | None, index: torch.Tensor | None, out: torch.Tensor) -> None:
        if isinstance(src, Stored):
            if dim is None or index is None:
                self._copy(src.key, slice(None), out)
                return
            lead = (slice(None),) * dim
            pos = 0
            for a, b in runs(index):
                self._copy(src.key, (*lead, slice(a, b)), out.narrow(dim, pos, b - a))
                pos += b - a
            return
        if dim != src.dim or index is None:  # every part contributes its own slice along ``dim``
            offset = 0
            for part in src.parts:
                if src.stack:
                    inner = None if dim is None else (dim if dim < src.dim else dim - 1)
                    self._fill(part, inner, index, out.select(src.dim, offset))
                    offset += 1
                else:
                    width = part.shape[src.dim]
                    self._fill(part, dim, index, out.narrow(src.dim, offset, width))
                    offset += width
            return
        # the slice runs along the joined dimension: each entry falls in one part
        bounds, offset = [], 0
        for part in src.parts:
            width = 1 if src.stack else part.shape[src.dim]
            bounds.append((offset, offset + width))
            offset += width
        pos = 0
        for a, b in runs(index):
            for i, (lo, hi) in enumerate(bounds):
                start, stop = max(a, lo), min(b, hi)
                if start >= stop:
                    continue
                part, n = src.parts[i], stop - start
                target = out.narrow(dim, pos, n)
                if src.stack:  # whole experts
                    self._fill(part, None, None, target.select(dim, 0))
                else:
                    self._fill(part, dim, torch.arange(start - lo, stop - lo), target)
                pos += n


def _natural(key: str) -> tuple[tuple[int, int | str], ...]:
    # experts.10 after experts.9, as transformers orders them before stacking
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in key.split("."))


def converted_sources(model: nn.Module, files: SafetensorsFiles) -> tuple[dict[str, Source], dict[str, str]]:
    """The parameters transformers assembles or renames on load (its ``conversion_mapping`` for this
    model), by the name they get: ``Joined`` trees over the stored per-expert tensors, or a renamed
    ``Stored``. Also, by name, why a parameter could not be assembled (a conversion op we do not read)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            Concatenate,
            MergeModulelist,
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:  # transformers < 5: checkpoints are stored as the modules name them
        return {}, {}
    transforms = get_model_conversion_mapping(model)  # type: ignore[arg-type]
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not renamings and not converters:
        return {}, {}
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    found: dict[str, Source] = {}
    gathered: dict[str, dict[str, list[str]]] = {}  # new name -> source pattern -> stored keys
    for key in sorted(files.names(), key=_natural):
        renamed, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            if renamed != key:
                found[renamed] = files.stored(key)
        else:
            gathered.setdefault(renamed, {}).setdefault(pattern, []).append(key)
    unreadable: dict[str, str] = {}
    for name, per_pattern in gathered.items():
        converter = by_pattern[next(iter(per_pattern))]
        ops = list(converter.operations)
        kinds = [type(op).__name__ for op in ops]
        if not ops or not isinstance(ops[0], MergeModulelist) or kinds[1:] not in ([], ["Concatenate"]):
            unreadable[name] = (
                f"transformers assembles it with {kinds}; this reader knows MergeModulelist[, Concatenate]"
            )
            continue
        stacks: list[Source] = []
        for pattern in converter.source_patterns:  # their order is the order of the concatenation
            keys = per_pattern.get(pattern, [])
            if not keys:
                unreadable[name] = f"no stored tensor matches {pattern!r}"
                break
            parts = tuple(files.stored(k) for k in keys)
            if len({p.shape for p in parts}) != 1:
                unreadable[name] = f"the tensors matching {pattern!r} differ in shape"
                break
            stacks.append(Joined(parts, ops[0].dim, stack=True))
        else:
            if len(ops) == 1:
                found[name] = stacks[0]
            else:
                concat = ops[1]
                assert isinstance(concat, Concatenate)
                found[name] = Joined(tuple(stacks), concat.dim, stack=False)
    if found:
        log.debug("autotp: %d checkpoint tensors assembled or renamed as transformers loads them", len(found))
    return found, unreadable
