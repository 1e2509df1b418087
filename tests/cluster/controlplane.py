"""Start and stop a local Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager and the
pod agent (tests/cluster/agent.py), all on loopback, as background processes recorded in a state directory.

    python -m tests.cluster.controlplane up   [--dir DIR]   # prints `export KUBECONFIG=...` and `export PATH=...`
    python -m tests.cluster.controlplane down [--dir DIR]

The binaries come from tests/cluster/binaries.py (built once per machine). Ports are picked free at start, so
several clusters (one per checkout or test session) coexist on one machine. `DIR/cluster.json` records the
processes; its presence next to a kubeconfig is how a test session recognises a cluster that `make cluster`
started and reuses it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from conveyor.utils import free_port

from tests.cluster import binaries
from tests.cluster.pki import make_pki, write_kubeconfig

ROOT = Path(__file__).resolve().parents[2]
NODE_NAME = "conveyor-local"
SERVICE_CIDR = "10.0.0.0/24"
CONTROLLERS = (
    "statefulset-controller",
    # A Service's EndpointSlices (ready = the pod's Ready condition): serve tests check what a Service selects.
    "endpointslice-controller",
    "deployment-controller",  # with the ReplicaSet controller: the Helm chart's operator Deployment
    "replicaset-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    # Removes the pvc-protection finalizer once no pod uses a claim; without it namespaces with PVCs never go.
    "persistentvolumeclaim-protection-controller",
)
STATE_FILE = "cluster.json"
# Children started by this process, kept so that they are reaped (not warned about) when stopped here.
_CHILDREN: dict[int, subprocess.Popen] = {}


@dataclass
class ClusterState:
    dir: str
    kubeconfig: str
    server: str
    checkout: str
    pids: dict[str, int] = field(default_factory=dict)  # component -> pid, in start order

    @classmethod
    def load(cls, directory: Path) -> ClusterState | None:
        path = directory / STATE_FILE
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))

    def save(self) -> None:
        (Path(self.dir) / STATE_FILE).write_text(json.dumps(asdict(self), indent=2))


def default_dir(checkout: Path = ROOT) -> Path:
    """One `make cluster` per checkout: worktrees of one machine do not share a cluster."""
    digest = hashlib.sha256(str(checkout).encode()).hexdigest()[:10]
    return binaries.cache_dir() / "k8s" / "clusters" / digest


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def _start(name: str, argv: list[str], directory: Path, env: dict[str, str] | None = None) -> int:
    log = open(directory / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env
    )
    log.close()
    _CHILDREN[proc.pid] = proc
    return proc.pid


def _api_get(state: ClusterState, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    pki_dir = Path(state.dir) / "pki"
    ctx = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
    token = (pki_dir / "tokens.csv").read_text().split(",", 1)[0]
    req = urllib.request.Request(state.server + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _wait(what: str, check, state: ClusterState, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, pid in state.pids.items():
            if not _alive(pid):
                log = Path(state.dir) / "logs" / f"{name}.log"
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise RuntimeError(f"{name} exited while waiting for {what}; its log ({log}) ends:\n{tail}")
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s; logs in {Path(state.dir) / 'logs'}")


def is_live(state: ClusterState) -> bool:
    """Every recorded process runs and the API server answers /readyz."""
    if not state.pids or not all(_alive(pid) for pid in state.pids.values()):
        return False
    try:
        return _api_get(state, "/readyz")[0] == 200
    except OSError:
        return False


def up(directory: Path, checkout: Path = ROOT, python: str = sys.executable) -> ClusterState:
    """Start the control plane and agent in `directory` (or return the live one already there)."""
    directory = directory.resolve()
    existing = ClusterState.load(directory)
    if existing is not None:
        if is_live(existing):
            return existing
        down(directory)
    bins = {name: str(binaries.binary(name)) for name in binaries.NAMES if name != "helm"}
    (directory / "logs").mkdir(parents=True, exist_ok=True)
    pki = make_pki(directory / "pki")
    etcd_client, etcd_peer, api_port, kcm_port = free_port(), free_port(), free_port(), free_port()
    server = f"https://127.0.0.1:{api_port}"
    kubeconfig = write_kubeconfig(pki, server, directory / "kubeconfig")
    state = ClusterState(
        dir=str(directory), kubeconfig=str(kubeconfig), server=server, checkout=str(checkout)
    )
    try:
        _start_all(state, directory, bins, pki, etcd_client, etcd_peer, api_port, kcm_port, python)
    except BaseException:
        state.save()
        down(directory)
        raise
    state.save()
    return state


def _start_all(state, directory, bins, pki, etcd_client, etcd_peer, api_port, kcm_port, python) -> None:
    etcd_url, peer_url = f"http://127.0.0.1:{etcd_client}", f"http://127.0.0.1:{etcd_peer}"
    state.pids["etcd"] = _start(
        "etcd",
        [
            bins["etcd"], "--name=default", f"--data-dir={directory / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            # A throwaway test store: durability costs fsyncs on a disk that five test runs share.
            "--unsafe-no-fsync", "--log-level=warn",
        ],
        directory,
    )  # fmt: skip
    state.save()
    issuer = "https://kubernetes.default.svc.cluster.local"
    state.pids["kube-apiserver"] = _start(
        "kube-apiserver",
        [
            bins["kube-apiserver"], f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
            f"--cert-dir={directory / 'pki'}",
            f"--tls-cert-file={pki.serving_cert}", f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_cert}", f"--token-auth-file={pki.token_file}",
            f"--service-account-key-file={pki.sa_pub}", f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-account-issuer={issuer}", f"--api-audiences={issuer}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--authorization-mode=RBAC",
            "--allow-privileged=true", "--profiling=false",
            # No real endpoints for `kubernetes.default` on loopback; nothing in the cluster needs them.
            "--endpoint-reconciler-type=none",
        ],
        directory,
    )  # fmt: skip
    state.save()
    _wait("kube-apiserver /readyz", lambda: _api_get(state, "/readyz")[0] == 200, state, 90)
    state.pids["kube-controller-manager"] = _start(
        "kube-controller-manager",
        [
            bins["kube-controller-manager"], f"--kubeconfig={state.kubeconfig}",
            f"--controllers={','.join(CONTROLLERS)}", "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={kcm_port}",
            f"--service-account-private-key-file={pki.sa_key}", f"--root-ca-file={pki.ca_cert}",
            "--use-service-account-credentials=false", "--profiling=false",
        ],
        directory,
    )  # fmt: skip
    state.save()
    env = dict(os.environ, PYTHONPATH=str(state.checkout), PYTHONUNBUFFERED="1")
    state.pids["agent"] = _start(
        "agent",
        [
            python, "-m", "tests.cluster.agent", f"--kubeconfig={state.kubeconfig}", f"--node={NODE_NAME}",
            f"--state-dir={directory / 'agent'}", f"--checkout={state.checkout}", f"--python={python}",
        ],
        directory,
        env=env,
    )  # fmt: skip
    state.save()
    # Ready for tests once the agent's Node is Ready and the service-account controller has run (pods are
    # refused in a namespace until its `default` ServiceAccount exists).
    _wait(
        "the agent's Node",
        lambda: (
            b'"type":"Ready","status":"True"'
            in _api_get(state, f"/api/v1/nodes/{NODE_NAME}")[1].replace(b" ", b"")
        ),
        state,
        60,
    )
    _wait(
        "the default ServiceAccount",
        lambda: _api_get(state, "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
        state,
        60,
    )


def down(directory: Path, grace: float = 15.0) -> None:
    """Stop every recorded process (agent first, so that it stops its pods), then remove the state."""
    directory = directory.resolve()
    state = ClusterState.load(directory)
    if state is None:
        return
    for name, pid in reversed(list(state.pids.items())):
        if not _alive(pid):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)  # each component leads its own session (start_new_session)
        deadline = time.monotonic() + grace
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            print(
                f"controlplane: {name} ({pid}) ignored SIGTERM for {grace:.0f} s; killing it", file=sys.stderr
            )
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        child = _CHILDREN.pop(pid, None)
        if child is not None:
            child.wait()
    (directory / STATE_FILE).unlink(missing_ok=True)
    subprocess.run(["rm", "-rf", str(directory / "etcd")], check=False)


def tool_path() -> str:
    return f"{binaries.bin_dir()}:{os.environ.get('PATH', '')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.controlplane", description=__doc__)
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--dir", type=Path, default=None, help="state directory (default: one per checkout)")
    args = parser.parse_args(argv)
    directory = args.dir or default_dir()
    if args.command == "up":
        binaries.build()  # helm too: `make cluster` puts it on PATH
        start = time.monotonic()
        state = up(directory)
        print(f"# control plane ready in {time.monotonic() - start:.1f} s; logs in {directory / 'logs'}")
        print(f"export KUBECONFIG={state.kubeconfig}")
        print(f"export PATH={binaries.bin_dir()}:$PATH")
    elif args.command == "down":
        down(directory)
        print(f"# control plane in {directory} stopped")
    else:
        state = ClusterState.load(directory)
        live = state is not None and is_live(state)
        print(f"{'live' if live else 'not running'}: {directory}")
        return 0 if live else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
