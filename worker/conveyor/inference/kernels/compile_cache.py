"""The persistent compile cache: what warm-up makes, kept on disk so a restarted group, a second replica
or the next job starts warm.

One directory (``spec.cache``: a volume shared by a job's or a fleet's replicas; ``conveyor run``
uses ``~/.cache/conveyor/compile``) holds inductor's caches (FX graphs, AOT autograd, autotuning),
Triton's compiled kernels and skinny_matmul's tile choices. Each is keyed by what makes it valid and
nothing per pod: inductor and Triton key theirs by source, torch/Triton versions and device; the
tile choices file is named by GPU model and torch/Triton versions, and its rows by shape and dtype
(not device index: a tensor-parallel rank on cuda:1 reads what cuda:0 measured). Writers replace
files atomically, so replicas can share the directory while they write it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from conveyor.inference.progress import write_json_atomic


def configure(cache_dir: Path | None) -> None:
    """Process-wide compiler settings, made once at an entry point before anything compiles."""
    import torch._dynamo
    import torch._inductor.config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # An explicit setting by the user wins. Importing torch._dynamo writes inductor's default
        # (/tmp/torchinductor_$USER) into the environment, so that value counts as unset: taken for the
        # user's, it kept every compiled graph out of the job's cache, and a second replica found none.
        if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "inductor")
        os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir / "triton"))
        try:
            import triton

            knobs = getattr(triton, "knobs", None)
            if knobs is not None:
                knobs.cache.dir = os.environ["TRITON_CACHE_DIR"]
        except ImportError:
            pass
    # Round where eager rounds (bf16 after each op), so compiled decode gives eager's tokens; the
    # kernels are memory-bound, the extra conversions cost nothing measurable.
    torch._inductor.config.emulate_precision_casts = True
    torch._inductor.config.fx_graph_cache = True
    # Warm-up compiles a handful of graphs; a limit reached would silently fall back to eager.
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 1024)
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:  # the user's setting wins
        # Inductor sizes its compile workers by the host's cores (up to 32), per process: 8 ranks of a
        # TP-8 pod would start 256, each a Python with torch, against the pod's CPU and memory limits.
        torch._inductor.config.compile_threads = min(32, cpu_share())


def cpu_share(environ: Mapping[str, str] | None = None, cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs one rank may keep busy compiling: the pod's CPU limit (its cgroup's quota) or the CPUs it may
    run on, whichever is fewer, shared by the pod's ranks (LOCAL_WORLD_SIZE); at least 1."""
    environ = os.environ if environ is None else environ
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = _cgroup_cpu_limit(cgroup)
    if limit is not None:
        cpus = min(cpus, limit)
    try:
        ranks = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks = 1
    return max(1, cpus // ranks)


def _cgroup_cpu_limit(root: Path) -> int | None:
    """The CPU quota of this process's cgroup in whole CPUs (rounded up), None when it has none."""
    try:  # cgroup v2: "max 100000" or "QUOTA PERIOD"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: a quota of -1 is no limit
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else max(1, math.ceil(quota_us / period_us))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


class TileChoices:
    """skinny_matmul's tile choices for this GPU model, torch and Triton, in ``cache_dir``."""

    def __init__(self, cache_dir: Path, device_name: str, device_index: int = 0, triton_version: str = ""):
        self.device_index = device_index
        self.path = cache_dir / (
            f"tiles-{_slug(device_name)}-torch{_slug(torch.__version__)}-triton{_slug(triton_version)}.json"
        )

    @classmethod
    def for_device(cls, cache_dir: Path, device: torch.device) -> TileChoices:
        import triton

        return cls(cache_dir, torch.cuda.get_device_name(device), device.index or 0, triton.__version__)

    def _read(self) -> list[dict[str, Any]]:
        try:
            return list(json.loads(self.path.read_text())["choices"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return []  # none yet, or unreadable: measured again (never trusted half-written)

    def load(self) -> int:
        """Add the saved choices to skinny_matmul's; returns how many."""
        from conveyor.inference.kernels import skinny_matmul

        rows = self._read()
        for row in rows:
            key = (
                row["n"],
                row["k"],
                row["m"],
                getattr(torch, row["dtype"]),
                getattr(torch, row["weight_dtype"]),
                self.device_index,
                row["gate_up"],
            )
            skinny_matmul._CHOICES.setdefault(
                key, skinny_matmul.Tiles(**row["tiles"]) if row["tiles"] else None
            )
        return len(rows)

    def save(self) -> None:
        """This device's choices, merged with what the file holds (another replica may have added some)."""
        from conveyor.inference.kernels import skinny_matmul

        rows = {
            json.dumps({k: v for k, v in r.items() if k != "tiles"}, sort_keys=True): r for r in self._read()
        }
        for (n, k, m, dtype, weight_dtype, index, gate_up), tiles in skinny_matmul._CHOICES.items():
            if index != self.device_index:
                continue
            row = {
                "n": n,
                "k": k,
                "m": m,
                "dtype": str(dtype).removeprefix("torch."),
                "weight_dtype": str(weight_dtype).removeprefix("torch."),
                "gate_up": gate_up,
            }
            rows[json.dumps(row, sort_keys=True)] = {**row, "tiles": None if tiles is None else vars(tiles)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            self.path, {"choices": sorted(rows.values(), key=lambda r: json.dumps(r, sort_keys=True))}
        )
