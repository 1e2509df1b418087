"""Shared test helpers. Tier markers (integration, e2e, gpu, cluster) are declared in pyproject.toml."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The cluster fixtures need the kubernetes client; the GPU machine runs the engine's tests without it.
pytest_plugins = ["tests.cluster.fixtures"] if importlib.util.find_spec("kubernetes") else []


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child Python processes that import this checkout (worktrees included) without an
    installed package: PYTHONPATH points at worker/ and operator/ of the checkout under test."""
    env = dict(os.environ)
    paths = [str(ROOT / "worker"), str(ROOT / "operator"), str(ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


def conveyor_cmd(*args: str) -> list[str]:
    """`conveyor ARGS...` as a child process of this interpreter (use with subprocess_env())."""
    return [sys.executable, "-m", "conveyor", *args]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
