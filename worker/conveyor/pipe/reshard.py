"""A checkpoint's tensor-parallel shards cut for another tensorParallel, as it loads.

A checkpoint keys a shard by the tensor rank and size it was saved with (``...attn.wqkv.weight@tp1of2``,
pipe/sharding.py; saved with tensorParallel 1: the plain name). When the run's size differs, each rank
reads from the checkpoint's metadata which size a parameter was saved with, asks DCP for only the saved
shards that overlap its own part (saved over 2 ranks, loaded on 1: both; saved over 1, loaded on 2: the
whole tensor on each), at the sizes the metadata gives, and cuts its part out by the parameter's
``ShardLayout``. A parameter's optimizer state follows it: Adam's moments are shaped like it and are cut
the same way; its scalars (Adam's step) are equal on every saved rank and are taken from the first.
A parameter no module names a layout for (norms, a row-parallel bias) keeps one key and loads as it is;
so do the stages, whose layers are keyed by global index.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from conveyor.commit_protocol import CheckpointError
from conveyor.pipe.sharding import ShardLayout, shard_key, split_shard_key


@dataclass
class _Pending:
    """An entry of the state to load that the checkpoint holds only under another tensorParallel."""

    entries: dict[str, Any]  # the model's or the optimizer's entries, where it goes back
    key: str  # its key there (this rank's shard, at this run's size)
    sources: list[str]  # the saved shards' keys in ``entries``, by saved tensor rank from ``first``
    first: int
    saved_size: int
    name: str  # the parameter's name, for an error
    layout: ShardLayout | None  # None: a scalar, the first source's value as it is
    rank: int  # the part wanted: tensor rank ``rank`` of ``size`` (0 of 1: the whole tensor)
    size: int


def overlapping(rank: int, size: int, saved_size: int) -> range:
    """The saved tensor ranks whose parts of a tensor overlap tensor rank ``rank`` of ``size``'s part."""
    return range(rank * saved_size // size, -(-(rank + 1) * saved_size // size))


def cut(
    shards: list[torch.Tensor],
    first: int,
    saved_size: int,
    layout: ShardLayout,
    rank: int,
    size: int,
    name: str = "a parameter",
) -> torch.Tensor:
    """Tensor rank ``rank`` of ``size``'s shard, from consecutive saved shards (saved tensor ranks
    ``first``, ``first + 1``, ... of ``saved_size``) that cover it."""
    dim, total = layout.dim, sum(layout.segments)
    width = shards[0].shape[dim]
    if any(width * s % total for s in layout.segments):
        raise CheckpointError(
            f"checkpoint's {name}: a shard of width {width} is not its {layout.segments} segments"
        )
    widths = [width * s // total for s in layout.segments]  # one saved shard's part of each segment
    split = [t.split(widths, dim) for t in shards]
    pieces = []
    for j, saved_width in enumerate(widths):
        whole = saved_width * saved_size
        if whole % size:
            raise CheckpointError(
                f"spec.parallelism.tensorParallel: the checkpoint's {name} ({whole} along dimension {dim}) "
                f"does not split over {size} tensor ranks; use a tensorParallel that divides it"
            )
        part = whole // size
        span = torch.cat([s[j] for s in split], dim)  # [first, first + len) saved parts of segment j
        pieces.append(span.narrow(dim, rank * part - first * saved_width, part))
    return torch.cat(pieces, dim).clone()  # its own storage, not a view of the loaded shards


def saved_sizes(saved: Mapping[str, Any]) -> dict[str, int]:
    """Parameter name -> the tensorParallel its shards were saved with, from the checkpoint's keys."""
    out: dict[str, int] = {}
    for key in saved:
        if key.startswith("model.") and (found := split_shard_key(key.removeprefix("model."))):
            out[found[0]] = found[2]
    return out


def plan(
    state: dict[str, Any],
    saved: Mapping[str, Any],
    layouts: Mapping[str, ShardLayout],
    shard_keys: Mapping[str, str],
    rank: int,
    size: int,
) -> list[_Pending]:
    """Replace in ``state`` (``model`` and ``optimizer`` entries, keyed for this run) every splittable
    parameter's entries that ``saved`` (the checkpoint's metadata) holds only under another
    tensorParallel by empty tensors under the saved shards' keys, at their saved sizes, for DCP to fill;
    ``finish`` cuts them. Entries saved under their own key are left alone. A splittable parameter this
    run keeps whole (not in ``shard_keys``: tensorParallel 1, or a vocabulary it does not divide) is
    joined from every saved shard."""
    sizes = saved_sizes(saved)
    pending: list[_Pending] = []
    for name, layout in layouts.items():
        key = shard_keys.get(name, name)
        if f"model.{key}" in saved or key not in state["model"]:
            continue
        saved_size = 1 if f"model.{name}" in saved else sizes.get(name)
        want_rank, want_size = (rank, size) if name in shard_keys else (0, 1)
        if saved_size is None or saved_size == want_size:
            continue  # not in the checkpoint at all: the load's missing-weights check says so
        ranks = overlapping(want_rank, want_size, saved_size)
        keys = [name if saved_size == 1 else shard_key(name, s, saved_size) for s in ranks]
        entries: list[tuple[str, str, list[str], ShardLayout | None]] = [("model", key, keys, layout)]
        prefix = f"state.{key}."
        for entry in [k for k in state["optimizer"] if k.startswith(prefix)]:
            what = entry.removeprefix(prefix)
            value = state["optimizer"][entry]
            shaped = isinstance(value, torch.Tensor) and value.dim() > 0
            sources = [f"state.{k}.{what}" for k in keys] if shaped else [f"state.{keys[0]}.{what}"]
            entries.append(("optimizer", entry, sources, layout if shaped else None))
        for part, entry, sources, shard_layout in entries:
            target = state[part]
            template = target.pop(entry)
            for source in sources:
                meta = saved.get(f"{part}.{source}")
                if meta is None:
                    raise CheckpointError(
                        f"the checkpoint has no {part}.{source} to cut {name} from for tensorParallel {size}: "
                        "it was saved from a different model or optimizer"
                    )
                is_tensor = isinstance(template, torch.Tensor)
                target[source] = (
                    torch.empty(meta.size, dtype=template.dtype, device=template.device)
                    if is_tensor
                    else template
                )
            pending.append(
                _Pending(
                    target, entry, sources, ranks.start, saved_size, name, shard_layout, want_rank, want_size
                )
            )
    return pending


def finish(pending: list[_Pending]) -> None:
    """After DCP filled the saved shards ``plan`` asked for: this rank's parts under their own keys."""
    for p in pending:
        loaded = [p.entries.pop(source) for source in p.sources]
        if p.layout is None:
            p.entries[p.key] = loaded[0]
        else:
            p.entries[p.key] = cut(loaded, p.first, p.saved_size, p.layout, p.rank, p.size, p.name)
