"""The agent's pod networks: a pod replaced under its name keeps its own namespace; link-layer addresses
that never change; a torn-down pod off the bridge even while its namespace lingers."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster.network import POD_CIDR, NetnsNetwork, mac_of

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


def _link_macs(netns: str, *args: str) -> dict[str, str]:
    """Interface name -> MAC of the links `ip -n NETNS link show ARGS` lists."""
    out = subprocess.run(
        ["ip", "-n", netns, "-br", "link", "show", *args], capture_output=True, text=True, check=True
    ).stdout
    return {line.split()[0].split("@")[0]: line.split()[2] for line in out.splitlines() if line.strip()}


def _eth0(network: NetnsNetwork, pod: str) -> str:
    netns = network.netns("ns", pod)
    assert netns is not None
    return _link_macs(netns, "eth0")["eth0"]


def test_link_addresses_stay_put_as_pods_come_and_go(tmp_path: Path) -> None:
    """The hub's MAC never changes (a bridge otherwise takes its lowest port's and changes it as ports come
    and go, leaving every pod's ARP entry for the hub wrong), and a pod's MAC follows its address, so its
    replacement under the same name is reached by peers that cached the old one's."""
    network = NetnsNetwork(tmp_path)
    try:
        hub_mac = mac_of(str(next(POD_CIDR.hosts())))  # the bridge holds the first address
        seen = []
        for pod in ("a-0", "a-1", "b-0"):
            network.setup("ns", pod)
            seen.append(_link_macs(network.hub, "br0")["br0"])
            assert _eth0(network, pod) == mac_of(network.address("ns", pod))
        network.teardown("ns", "a-0")
        seen.append(_link_macs(network.hub, "br0")["br0"])
        network.setup("ns", "a-0")  # replaced: same address, same MAC
        assert _eth0(network, "a-0") == mac_of(network.address("ns", "a-0"))
        seen.append(_link_macs(network.hub, "br0")["br0"])
        assert set(seen) == {hub_mac}
        assert len({mac_of(network.address("ns", p)) for p in ("a-0", "a-1", "b-0")}) == 3
    finally:
        network.close()


def test_a_lingering_namespace_leaves_the_bridge(tmp_path: Path) -> None:
    """A namespace outlives `ip netns del` while something in it is alive (an orphaned TCP socket
    retransmitting, here a process); torn down, it must be off the bridge, or it answers for the address the
    pod's replacement holds."""
    network = NetnsNetwork(tmp_path)
    holder = None
    try:
        network.setup("ns", "p-0")
        name = network.netns("ns", "p-0")
        assert name is not None
        assert len(_link_macs(network.hub, "master", "br0")) == 1
        holder = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "60"])
        inside = Path(f"/run/netns/{name}").stat().st_ino
        deadline = time.monotonic() + 10
        while Path(f"/proc/{holder.pid}/ns/net").stat().st_ino != inside:  # it entered the namespace
            assert time.monotonic() < deadline, "the holder never entered the pod's namespace"
            time.sleep(0.05)
        network.teardown("ns", "p-0")
        assert name not in _namespaces()
        assert _link_macs(network.hub, "master", "br0") == {}
        # the namespace itself is still alive (held by the process), now without its eth0
        links = subprocess.run(
            ["nsenter", "-t", str(holder.pid), "-n", "ip", "-br", "link", "show"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "eth0" not in links and "lo" in links
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        network.close()
