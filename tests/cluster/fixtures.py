"""pytest fixtures for tests against the local control plane (tests/cluster/controlplane.py).

- `k8s_cluster` (session): the control plane and agent, started once per test session (built first if needed,
  minutes once per machine), or the one `make cluster` started for this checkout when KUBECONFIG points to it.
  Skips only where Go is absent.
- `k8s_namespace` (function): a fresh namespace with the CRDs of crds/*.yaml applied, deleted afterwards.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kubernetes import client, config

from tests.cluster import binaries, controlplane

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Cluster:
    kubeconfig: str
    dir: Path
    api_client: client.ApiClient = field(repr=False)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api_client)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api_client)

    def env(self) -> dict[str, str]:
        """Environment for child processes (kubectl, helm, the operator) that talk to this cluster."""
        return dict(os.environ, KUBECONFIG=self.kubeconfig, PATH=controlplane.tool_path())

    def run(
        self, tool: str, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(binaries.binary(tool)), *args],
            env=self.env(),
            input=input,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{tool} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess:
        return self.run("kubectl", *args, check=check, input=input)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("helm", *args, check=check)

    def pod_logs(self, namespace: str, pod: str, container: str | None = None) -> str:
        """Everything the pod's containers wrote (all restarts, all incarnations of the pod name)."""
        text = []
        for pod_dir in sorted(
            (self.dir / "agent" / "pods").glob(f"{namespace}_{pod}_*"), key=os.path.getmtime
        ):
            for log in sorted(pod_dir.glob(f"{container or '*'}/*.log"), key=os.path.getmtime):
                text.append(log.read_text(errors="replace"))
        return "".join(text)


def _reusable() -> controlplane.ClusterState | None:
    """The `make cluster` of this checkout, when KUBECONFIG points to it and it is live."""
    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig:
        return None
    state = controlplane.ClusterState.load(Path(kubeconfig).resolve().parent)
    if state is None or Path(state.checkout).resolve() != ROOT or not controlplane.is_live(state):
        return None
    return state


_build_error: list[str] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the binaries (minutes, once per machine) before any test starts, so that the cold build does
    not count against the first cluster test's timeout."""
    if session.config.option.collectonly or not binaries.go_available():
        return
    if any("k8s_cluster" in getattr(item, "fixturenames", ()) for item in session.items):
        try:
            binaries.build()
        except subprocess.CalledProcessError as err:
            _build_error.append(
                f"building the control plane failed ({err}); see tests/cluster/build.sh output"
            )


@pytest.fixture(scope="session")
def k8s_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not binaries.go_available():
        pytest.skip("the local Kubernetes control plane is built from Go modules and `go` is not on PATH")
    if _build_error:
        pytest.fail(_build_error[0])
    state = _reusable()
    started = state is None
    if state is None:
        state = controlplane.up(tmp_path_factory.mktemp("cluster"))
    api_client = config.new_client_from_config(config_file=state.kubeconfig)
    try:
        yield Cluster(kubeconfig=state.kubeconfig, dir=Path(state.dir), api_client=api_client)
    finally:
        api_client.close()
        if started:
            controlplane.down(Path(state.dir))


def apply_crds(cluster: Cluster) -> list[str]:
    """Apply crds/*.yaml (server-side) and wait until each is Established; returns their names."""
    files = sorted((ROOT / "crds").glob("*.yaml")) if (ROOT / "crds").is_dir() else []
    if not files:
        return []
    args = [a for f in files for a in ("-f", str(f))]
    cluster.kubectl("apply", "--server-side", "--force-conflicts", *args)
    names = cluster.kubectl("get", *args, "-o", "name").stdout.split()
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *names)
    return names


@pytest.fixture
def k8s_namespace(k8s_cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base}-{secrets.token_hex(3)}"
    apply_crds(k8s_cluster)
    core = k8s_cluster.core
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"conveyor.dev/test": "true"}))
    )
    # Pods are refused until the service-account controller has made the namespace's `default` account.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(sa.metadata.name == "default" for sa in core.list_namespaced_service_account(name).items):
            break
        time.sleep(0.1)
    try:
        yield name
    finally:
        core.delete_namespace(name)
        deadline = time.monotonic() + 60
        while core.list_namespace(field_selector=f"metadata.name={name}").items:
            if time.monotonic() > deadline:
                leftovers = _strip_finalizers(k8s_cluster, name)
                raise AssertionError(
                    f"namespace {name} still exists 60 s after its deletion; objects held by finalizers "
                    f"(stripped now so the cluster stays usable): {leftovers}"
                )
            time.sleep(0.25)


def _strip_finalizers(cluster: Cluster, namespace: str) -> list[str]:
    """Remove finalizers from the namespace's custom objects (an operator that stopped cannot)."""
    stuck = []
    for crd in apply_crds(cluster):
        kind = crd.split("/", 1)[1]  # customresourcedefinition.apiextensions.k8s.io/NAME -> NAME
        proc = cluster.kubectl("get", kind, "-n", namespace, "-o", "name", check=False)
        for obj in proc.stdout.split():
            stuck.append(obj)
            cluster.kubectl(
                "patch", obj, "-n", namespace, "--type=merge", "-p", '{"metadata":{"finalizers":null}}'
            )
    return stuck
