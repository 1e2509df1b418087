"""Splitting a list of layers into contiguous stages. Pure functions on weights; no torch modules.

Methods (DeepSpeed's): ``parameters`` balances parameter counts, ``uniform`` balances layer counts,
``type:REGEX`` balances the layers whose class name matches REGEX (others ride along with their
neighbours), and an explicit list of boundaries ``[0, b1, ..., n]`` is taken as given.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


class PartitionError(ValueError):
    pass


def _check_bounds(
    bounds: list[int], num_layers: int, num_stages: int, method: object, names: Sequence[str]
) -> list[int]:
    if len(bounds) != num_stages + 1 or bounds[0] != 0 or bounds[-1] != num_layers:
        raise PartitionError(
            f"partition_method={method!r}: boundaries must be {num_stages + 1} numbers from 0 to "
            f"{num_layers} (one start per stage, then the number of layers), got {bounds}"
        )
    for stage in range(num_stages):
        if bounds[stage + 1] <= bounds[stage]:
            listing = ", ".join(f"{i}:{n}" for i, n in enumerate(names))
            raise PartitionError(
                f"partition_method={method!r} leaves stage {stage} of {num_stages} empty (boundaries {bounds}, "
                f"{num_layers} layers: {listing}): use fewer stages, more layers, or another partition method"
            )
    return bounds


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """Boundaries giving each part floor or ceil of num_items / num_parts items."""
    return [(part * num_items) // num_parts for part in range(num_parts + 1)]


def partition_balanced(weights: Sequence[int], num_parts: int) -> list[int]:
    """Contiguous boundaries minimising the heaviest part, each part at least one item (linear partition
    by dynamic programming; layer counts are small)."""
    n = len(weights)
    if n < num_parts:
        return partition_uniform(n, num_parts)  # the caller reports the empty stage
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[k][i]: smallest max-part weight splitting the first i items into k non-empty parts
    best = [[inf] * (n + 1) for _ in range(num_parts + 1)]
    cut = [[0] * (n + 1) for _ in range(num_parts + 1)]
    best[0][0] = 0
    for k in range(1, num_parts + 1):
        for i in range(k, n - (num_parts - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    bounds = [n]
    for k in range(num_parts, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return bounds[::-1]


def partition(
    method: str | Sequence[int],
    num_stages: int,
    param_counts: Sequence[int],
    class_names: Sequence[str],
) -> list[int]:
    """Stage boundaries: stage s owns layers ``bounds[s]:bounds[s + 1]``."""
    n = len(param_counts)
    if num_stages < 1:
        raise PartitionError(f"num_stages must be >= 1, got {num_stages}")
    if n < num_stages:
        raise PartitionError(
            f"{n} layers cannot fill {num_stages} stages (every stage needs at least one layer): use at most "
            f"{n} stages or split the model into more layers"
        )
    if not isinstance(method, str):
        return _check_bounds([int(b) for b in method], n, num_stages, list(method), class_names)
    key = method.lower()
    if key == "uniform":
        bounds = partition_uniform(n, num_stages)
    elif key == "parameters":
        bounds = (
            partition_balanced(param_counts, num_stages)
            if any(param_counts)
            else partition_uniform(n, num_stages)
        )
    elif key.startswith("type:"):
        try:
            pattern = re.compile(method[5:], re.IGNORECASE)
        except re.error as err:
            raise PartitionError(
                f"partition_method={method!r}: {method[5:]!r} is not a regular expression ({err}): write "
                "'type:' followed by a pattern of layer class names, e.g. 'type:Block'"
            ) from None
        matched = [i for i, name in enumerate(class_names) if pattern.search(name)]
        if len(matched) < num_stages:
            raise PartitionError(
                f"partition_method={method!r} matches {len(matched)} layers ({sorted(set(class_names))} are the "
                f"layer classes) but there are {num_stages} stages: each stage needs at least one match"
            )
        # Stage s starts at its first matched layer; unmatched layers stay with the stage before them.
        split = partition_uniform(len(matched), num_stages)
        bounds = [0] + [matched[split[s]] for s in range(1, num_stages)] + [n]
    else:
        raise PartitionError(
            f"unknown partition_method {method!r}: use 'parameters', 'uniform', 'type:REGEX' or a list of "
            f"{num_stages + 1} boundaries"
        )
    return _check_bounds(bounds, n, num_stages, method, class_names)
