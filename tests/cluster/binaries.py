"""The local control plane's binaries, built on demand from the pinned Go modules in tests/cluster/tools/.

`binary("kubectl")` returns the path of a built binary, building it first (minutes, once per machine) when it
is missing or its pins changed. The build itself is tests/cluster/build.sh; this module only locates it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build.sh"
NAMES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "helm")


def cache_dir() -> Path:
    return Path(os.environ.get("CONVEYOR_CACHE", Path.home() / ".cache" / "conveyor"))


def bin_dir() -> Path:
    return Path(os.environ.get("CONVEYOR_K8S_BIN", cache_dir() / "k8s" / "bin"))


def go_available() -> bool:
    return shutil.which("go") is not None


def build(*names: str) -> None:
    """Build (or confirm up to date) the named binaries; all of them when none is named."""
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ValueError(f"unknown binary {unknown}: choose from {', '.join(NAMES)}")
    if not go_available():
        raise RuntimeError("building the local control plane needs the Go toolchain (`go` on PATH)")
    subprocess.run(["bash", str(BUILD_SCRIPT), *names], check=True)


@cache
def binary(name: str) -> Path:
    """Path of the built binary `name` (one of NAMES), building it when missing or out of date (checked
    once per process)."""
    build(name)
    return bin_dir() / name
