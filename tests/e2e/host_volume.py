"""A directory of this machine mounted at its own path in a job's pods: the operator refuses an inference
job whose output would die with its pods (results_storage.py), and the pod agent maps a hostPath volume
to that path itself (tests/cluster/podspec.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def keep_on_the_host(spec: dict[str, Any], directory: Path) -> dict[str, Any]:
    """``spec`` with ``directory`` mounted from the host at the same path."""
    template = spec.setdefault("template", {})
    template.setdefault("volumes", []).append({"name": "results", "hostPath": {"path": str(directory)}})
    template.setdefault("volumeMounts", []).append({"name": "results", "mountPath": str(directory)})
    return spec
