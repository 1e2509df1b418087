"""Python's bytecode, kept with the compile cache when the image ships none.

A rank imports torch, its compiler (dynamo, inductor) and Triton: some 14 s of byte-compiling Python
source when no bytecode is kept. The H200 machine runs that way (PYTHONDONTWRITEBYTECODE set, torch
installed without ``__pycache__``): a profiled warm start of a 7B batch job spent 15 of its rank's 33 s
compiling Python source, at every start. Images are often built so (PYTHONDONTWRITEBYTECODE keeps layers
small), and a pod's writable layer is new at every start anyway. So where the bytecode is not shipped
beside the source, the entry points (``conveyor run``, ``worker``, ``generate``) point Python's bytecode
at the compile cache (``sys.pycache_prefix``, and ``PYTHONPYCACHEPREFIX`` for the processes they start),
and a restarted group, the next job or a second replica sharing ``spec.cache`` imports from bytecode.

Where the image ships its bytecode nothing changes: a prefix would hide it and make a cold start
compile what it already has. The directory is keyed by the interpreter and the installed distributions
(their dist-info names, so a new torch gets a new directory), and Python checks each file's bytecode
against its source's mtime and size as it does beside the source. Standard library only: this runs
before anything heavy is imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from collections.abc import MutableMapping, Sequence
from pathlib import Path

from conveyor.paths import compile_cache_dir

# The package whose bytecode tells whether the image ships it: the one that costs the most to compile.
PROBE = "torch"


def enable(
    cache_root: Path | None = None,
    environ: MutableMapping[str, str] = os.environ,
    *,
    probe: str = PROBE,
    search_path: Sequence[str] | None = None,
) -> Path | None:
    """Keep this process's bytecode, and its children's, under ``cache_root`` (default: the compile
    cache) where the image ships none. Returns the directory used, or None where nothing changed:
    bytecode shipped (or ``probe`` not installed), a prefix already chosen (by the user, or by the
    process that started this one), ``CONVEYOR_BYTECODE_CACHE=0``, or a cache that cannot be made."""
    if environ.get("CONVEYOR_BYTECODE_CACHE", "").strip().lower() in ("0", "false", "no", "off"):
        return None
    if environ.get("PYTHONPYCACHEPREFIX") or sys.pycache_prefix:
        return None
    if not shipped_without_bytecode(probe):
        return None
    directory = (cache_root or compile_cache_dir(environ)) / "python" / key(search_path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only or missing volume costs the compile, not the run
    sys.pycache_prefix = str(directory)
    sys.dont_write_bytecode = False  # the image's wish is to keep its own layers clean: this is not them
    environ["PYTHONPYCACHEPREFIX"] = str(directory)
    environ.pop("PYTHONDONTWRITEBYTECODE", None)
    return directory


def shipped_without_bytecode(probe: str = PROBE) -> bool:
    """Whether ``probe`` (a top-level package: found, not imported) has no bytecode beside its source."""
    try:
        spec = importlib.util.find_spec(probe)
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return False
    in_place = importlib.util.cache_from_source(spec.origin) if sys.pycache_prefix is None else None
    return in_place is not None and not os.path.exists(in_place)


def key(search_path: Sequence[str] | None = None) -> str:
    """The interpreter's cache tag and a digest of its version and the installed distributions."""
    names: set[str] = set()
    for entry in sys.path if search_path is None else search_path:
        if not entry:  # the working directory: differs between processes of one install
            continue
        try:
            names.update(n for n in os.listdir(entry) if n.endswith((".dist-info", ".egg-info")))
        except OSError:
            continue  # a zip file or a directory that is gone
    text = "\n".join([sys.version, *sorted(names)])
    return f"{sys.implementation.cache_tag}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
