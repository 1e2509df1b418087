"""The agent's pod networks: a pod replaced under its name keeps its own namespace."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.cluster.network import NetnsNetwork

pytestmark = pytest.mark.skipif(not NetnsNetwork.available(), reason="needs root, ip and unshare")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_the_old_pods_teardown_leaves_its_replacements_namespace(tmp_path: Path) -> None:
    """A force-deleted StatefulSet pod is recreated under the same name at once; the old pod's runner tears
    its network down after the new one set its own up."""
    network = NetnsNetwork(tmp_path)
    try:
        network.setup("ns", "faulty-1")
        old = network.netns("ns", "faulty-1")
        network.setup("ns", "faulty-1")  # the replacement, before the old runner finished
        new = network.netns("ns", "faulty-1")
        assert old != new and {old, new} <= _namespaces()
        network.teardown("ns", "faulty-1", old)
        assert new in _namespaces() and old not in _namespaces()
        assert network.netns("ns", "faulty-1") == new
        network.teardown("ns", "faulty-1", new)
        assert new not in _namespaces()
    finally:
        network.close()
