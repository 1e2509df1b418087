"""Fixtures of the chart tests: one helm binary per session and rendered manifests by values file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.charts.helm import CHART, find_helm, helm

Manifests = list[dict[str, Any]]


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    return find_helm()


@pytest.fixture(scope="session")
def render(helm_bin: Path) -> Callable[..., Manifests]:
    """`helm template` of the chart with values files and --set pairs, as parsed objects (cached)."""
    cache: dict[tuple[Any, ...], Manifests] = {}

    def _render(*values_files: Path, namespace: str = "conveyor-system", **sets: str) -> Manifests:
        key = (values_files, namespace, tuple(sorted(sets.items())))
        if key not in cache:
            args = ["template", "conveyor", str(CHART), "--namespace", namespace]
            for f in values_files:
                args += ["--values", str(f)]
            for name, value in sets.items():
                args += ["--set", f"{name}={value}"]
            out = helm(helm_bin, *args).stdout
            cache[key] = [doc for doc in yaml.safe_load_all(out) if doc]
        return cache[key]

    return _render


def of_kind(manifests: Manifests, kind: str) -> Manifests:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: Manifests, kind: str) -> dict[str, Any]:
    found = of_kind(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]
