"""Pod networking for the local agent: one address per pod, so that pods behave like separate hosts.

With root and `ip netns`, each pod gets its own network namespace (its own loopback and an `eth0` with an
address in POD_CIDR) joined to a bridge that lives in a private "hub" namespace (the bridge holds the
first address, so the hub reaches every pod): pods reach each other, the host's network is never touched, and two groups can both listen on MASTER_PORT. The pod's hostname (UTS
namespace) is its name and resolves, through the namespace's hosts file (`/etc/netns/NS/hosts`, which
`ip netns exec` mounts over /etc/hosts), to its own address, as in a real pod; that is what gloo binds to.

Link-layer addresses are fixed, so that no neighbour (ARP) cache on the network is ever wrong:
- the bridge's MAC is set explicitly. A Linux bridge otherwise takes the lowest MAC of its ports and changes
  it whenever pods come and go; every pod's cached MAC for the hub is then wrong, without a gratuitous ARP
  to correct it, and the pod's replies to the hub are dropped until its cache entry expires (tens of
  seconds; a request through the test's service proxy waited 50 s for an answer sent in 30 ms);
- a pod's MAC follows its address (02:42 and the four bytes of the IPv4 address, as Docker does), so a pod
  replaced under its name (same address) is reached at once by peers that cached the old one's MAC;
- teardown deletes the pod's veth pair before the namespace: a namespace outlives `ip netns del` while a
  socket in it still holds unacknowledged data (an orphaned TCP connection retransmits for minutes), and
  left on the bridge it would answer for the address that the pod's replacement now holds.

Without root the agent falls back to the host's loopback: every pod gets 127.0.0.1, and two groups that use
the same port on one agent collide (a limitation stated in docs/cluster.md).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import shutil
import subprocess
import threading
from pathlib import Path

from tests.cluster.apiaccess import SERVICE_IP, TOKEN_DIR

log = logging.getLogger("agent.network")
POD_CIDR = ipaddress.ip_network("10.244.0.0/16")
HOSTS_DIR = Path("/etc/netns")


def mac_of(address: str) -> str:
    """The MAC of the interface holding ``address``: locally administered, unicast, one per address."""
    return "02:42:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(address).packed)


def _ip(*args: str, check: bool = True) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


class LoopbackNetwork:
    """Every pod on the host's loopback (fallback without root)."""

    kind = "loopback"

    def address(self, namespace: str, pod: str) -> str:
        return "127.0.0.1"

    def setup(self, namespace: str, pod: str, service_account: Path | None = None) -> list[str]:
        """Create the pod's network; returns the argv prefix that runs a command inside it."""
        return []

    def netns(self, namespace: str, pod: str) -> str | None:
        return None

    def teardown(self, namespace: str, pod: str, netns: str | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class NetnsNetwork:
    """A network namespace per pod, bridged in a private hub namespace (see the module docstring)."""

    kind = "netns"

    def __init__(self, state_dir: Path) -> None:
        self.id = secrets.token_hex(2)  # several agents (clusters) on one machine never share names
        self.hub = f"cv{self.id}-hub"
        self.record = state_dir / "netns.txt"
        self._lock = threading.Lock()
        self._addresses: dict[
            tuple[str, str], str
        ] = {}  # (namespace, pod) -> address, stable across restarts
        self._hosts = POD_CIDR.hosts()
        self._gateway = str(next(self._hosts))  # the bridge's own address
        self._namespaces: dict[tuple[str, str], str] = {}
        self._host_sides: dict[str, str] = {}  # pod namespace -> its veth's end on the bridge
        self._counter = 0
        self._cleanup_recorded()
        self._remember(self.hub)
        _ip("netns", "add", self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "address", mac_of(self._gateway), "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        _ip("-n", self.hub, "link", "set", "lo", "up")
        # The bridge's own address: a process in the hub namespace reaches every pod, as a node does (tests
        # that stand in for kube-proxy connect to a Service's endpoints from there, see probe.py).
        _ip("-n", self.hub, "addr", "add", f"{self._gateway}/{POD_CIDR.prefixlen}", "dev", "br0")

    @staticmethod
    def available() -> bool:
        if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None:
            return False
        probe = f"cvprobe{secrets.token_hex(2)}"
        try:
            _ip("netns", "add", probe)
        except RuntimeError:
            return False
        _ip("netns", "del", probe, check=False)
        return True

    def _remember(self, name: str) -> None:
        with self.record.open("a") as f:
            f.write(name + "\n")

    def _cleanup_recorded(self) -> None:
        """Remove namespaces a previous agent with this state directory left behind (it was killed)."""
        if not self.record.exists():
            return
        for name in set(self.record.read_text().split()):
            _ip("netns", "del", name, check=False)
            shutil.rmtree(HOSTS_DIR / name, ignore_errors=True)
        self.record.unlink()

    def address(self, namespace: str, pod: str) -> str:
        """The pod's address; assigned on first use (a peer may ask before the pod starts) and kept."""
        with self._lock:
            key = (namespace, pod)
            if key not in self._addresses:
                self._addresses[key] = str(next(self._hosts))
            return self._addresses[key]

    def netns(self, namespace: str, pod: str) -> str | None:
        return self._namespaces.get((namespace, pod))

    def setup(self, namespace: str, pod: str, service_account: Path | None = None) -> list[str]:
        address = self.address(namespace, pod)
        with self._lock:
            self._counter += 1
            number = self._counter
            name = f"cv{self.id}-{number}"
            self._namespaces[(namespace, pod)] = name
            host_side = self._host_sides[name] = f"v{self.id}{number}"
            self._remember(name)
        _ip("netns", "add", name)
        _ip(
            "-n", self.hub, "link", "add", host_side, "type", "veth",
            "peer", "name", "eth0", "address", mac_of(address), "netns", name,
        )  # fmt: skip
        _ip("-n", self.hub, "link", "set", host_side, "master", "br0", "up")
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "addr", "add", f"{address}/{POD_CIDR.prefixlen}", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        hosts = HOSTS_DIR / name
        hosts.mkdir(parents=True, exist_ok=True)
        (hosts / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{address} {pod}\n")
        # The `kubernetes` Service's ClusterIP, served by apiaccess.ServiceForwarder inside this namespace.
        _ip("-n", name, "addr", "add", f"{SERVICE_IP}/32", "dev", "lo")
        # Run inside the namespace, with the pod's name as hostname (its own UTS namespace) and, in its own
        # mount namespace, the service-account files where in-cluster clients look for them.
        script = 'hostname "$0"'
        if service_account is not None:
            script += f' && mkdir -p {TOKEN_DIR} && mount --bind "$1" {TOKEN_DIR}'
        script += ' && shift && exec "$@"'
        return [
            "ip", "netns", "exec", name, "unshare", "--uts", "--mount", "--", "sh", "-c", script, pod,
            str(service_account or ""),
        ]  # fmt: skip

    def teardown(self, namespace: str, pod: str, netns: str | None = None) -> None:
        """Remove the pod's namespace: ``netns``, the one its runner set up, when given. A pod replaced
        under the same name (a force-deleted StatefulSet pod is recreated at once) has its own namespace
        by then, which the old runner's teardown must leave alone."""
        with self._lock:
            current = self._namespaces.get((namespace, pod))
            name = netns or current
            if name is not None and name == current:
                del self._namespaces[(namespace, pod)]
            host_side = self._host_sides.pop(name, None) if name is not None else None
        if name is None:
            return
        if host_side is not None:  # off the bridge now, even if the namespace lingers (module docstring)
            _ip("-n", self.hub, "link", "del", host_side, check=False)
        _ip("netns", "del", name, check=False)
        shutil.rmtree(HOSTS_DIR / name, ignore_errors=True)

    def close(self) -> None:
        for namespace, pod in list(self._namespaces):
            self.teardown(namespace, pod)
        _ip("netns", "del", self.hub, check=False)
        with contextlib.suppress(FileNotFoundError):
            self.record.unlink()


def make_network(state_dir: Path, mode: str = "auto") -> LoopbackNetwork | NetnsNetwork:
    """`auto`: per-pod namespaces where possible, else loopback."""
    if mode == "netns" or (mode == "auto" and NetnsNetwork.available()):
        return NetnsNetwork(state_dir)
    if mode not in ("auto", "loopback"):
        raise ValueError(f"--network must be auto, netns or loopback, not {mode!r}")
    log.warning("pods share the host's loopback: two groups using one port on this agent will collide")
    return LoopbackNetwork()
