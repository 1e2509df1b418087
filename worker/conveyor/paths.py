"""Where Conveyor keeps what outlives a process. Standard library only: the entry points read it before
anything heavy is imported (bytecode_cache.py)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

# The persistent compile cache when no volume is given (spec.cache): `conveyor run` on one machine.
DEFAULT_COMPILE_CACHE = Path.home() / ".cache" / "conveyor" / "compile"


def compile_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """CONVEYOR_COMPILE_CACHE (spec.cache's mount; benchmarks set it), else ``DEFAULT_COMPILE_CACHE``."""
    value = (os.environ if environ is None else environ).get("CONVEYOR_COMPILE_CACHE")
    return Path(value) if value else DEFAULT_COMPILE_CACHE
