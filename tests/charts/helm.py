"""Finding (or building) the helm binary for the chart tests, and running it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "conveyor"
CACHE = Path.home() / ".cache" / "conveyor"
HELM_VERSION = "v3.21.4"


def _build_with_go(go: str) -> Path:
    """The same build as tests/cluster (DESIGN.md: helm from the Go module proxy, stamped with the
    Kubernetes version its `helm template` assumes)."""
    bin_dir = CACHE / "k8s" / "bin"
    env = dict(
        os.environ,
        GOMODCACHE=str(CACHE / "go" / "mod"),
        GOCACHE=str(CACHE / "go" / "cache"),
        GOBIN=str(bin_dir),
        CGO_ENABLED="0",
    )
    ldflags = "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=35"
    subprocess.run(
        [go, "install", "-ldflags", ldflags, f"helm.sh/helm/v3/cmd/helm@{HELM_VERSION}"],
        env=env,
        check=True,
        cwd=str(CACHE),
        timeout=1200,
    )
    return bin_dir / "helm"


def find_helm() -> Path:
    """helm from tests.cluster.binaries (the cluster tier's builder), else the shared cache, else PATH,
    else built with Go; skips the calling test when none of these exists."""
    try:
        from tests.cluster.binaries import binary  # type: ignore[import-not-found]
    except ImportError:
        binary = None
    if binary is not None:
        return Path(binary("helm"))
    cached = CACHE / "k8s" / "bin" / "helm"
    if cached.exists():
        return cached
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path)
    go = shutil.which("go")
    if go is None:
        pytest.skip("no helm binary (~/.cache/conveyor/k8s/bin/helm or PATH) and no Go toolchain to build it")
    return _build_with_go(go)


def helm(binary: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run helm offline with a scratch HOME, so no user repositories or plugins leak into the test."""
    scratch = CACHE / "helm-test-home"
    env = dict(
        os.environ,
        HELM_CACHE_HOME=str(scratch / "cache"),
        HELM_CONFIG_HOME=str(scratch / "config"),
        HELM_DATA_HOME=str(scratch / "data"),
    )
    result = subprocess.run([str(binary), *args], env=env, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result
