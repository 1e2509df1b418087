"""`conveyor operator`: kopf options from the command line, and the torch-free import promise."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conveyor.cli import _parser
from conveyor_operator.main import kopf_options

from tests.conftest import subprocess_env


def options(*argv: str) -> dict[str, object]:
    return kopf_options(_parser().parse_args(["operator", *argv]))


def test_default_watches_all_namespaces_with_leader_election_and_liveness() -> None:
    opts = options()
    assert opts["clusterwide"] is True and opts["namespaces"] == []
    assert opts["standalone"] is False and opts["peering_name"] == "conveyor"
    assert opts["liveness_endpoint"] == "http://0.0.0.0:8081/healthz"
    assert isinstance(opts["priority"], int)


def test_namespace_scoping() -> None:
    opts = options("-n", "ml", "--namespace", "team-*")
    assert opts["clusterwide"] is False and opts["namespaces"] == ["ml", "team-*"]
    with pytest.raises(SystemExit, match="not both"):
        options("-n", "ml", "--all-namespaces")


def test_standalone_and_fixed_priority() -> None:
    opts = options("--standalone", "--priority", "7", "--health-port", "0")
    assert opts["standalone"] is True and opts["peering_name"] is None
    assert opts["priority"] == 7 and opts["liveness_endpoint"] is None


def test_operator_and_crd_generator_never_import_torch() -> None:
    code = (
        "import sys, conveyor_operator.main, conveyor_operator.handlers, conveyor.crd\n"
        "conveyor.crd.rendered_files()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'safetensors'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_handlers_are_registered_with_kopf() -> None:
    import conveyor_operator.handlers as handlers
    import kopf

    registry = kopf.get_default_registry()
    ids = {h.id for h in registry._watching.get_all_handlers()} | {
        h.id for h in registry._spawning.get_all_handlers()
    }
    for fn in (handlers.on_job_event, handlers.on_pod_event, handlers.resync):
        assert any(fn.__name__ in i for i in ids), ids


def test_without_a_cluster_it_says_so_without_a_traceback(tmp_path: object) -> None:
    from tests.conftest import conveyor_cmd

    env = subprocess_env(KUBECONFIG=str(tmp_path) + "/missing", KUBERNETES_SERVICE_HOST="")
    proc = subprocess.run(
        conveyor_cmd("operator", "--standalone", "--metrics-port", "0", "--health-port", "0"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no Kubernetes configuration" in proc.stderr
    assert "Traceback" not in proc.stderr
