"""The e2e tier's operator: `conveyor operator` of this checkout as a local process against the cluster."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import conveyor_cmd, subprocess_env


class Operator:
    """`conveyor operator` for one namespace, as a child process logging to a file."""

    def __init__(self, cluster, namespace: str, log: Path) -> None:
        self.cluster, self.namespace, self.log = cluster, namespace, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = subprocess_env(**{k: v for k, v in self.cluster.env().items() if k in ("KUBECONFIG", "PATH")})
        argv = conveyor_cmd("operator", "--namespace", self.namespace, "--standalone")
        argv += ["--metrics-port", "0", "--health-port", "0"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def operator(k8s_cluster, k8s_namespace, tmp_path):
    op = Operator(k8s_cluster, k8s_namespace, tmp_path / "operator.log")
    op.start()
    yield op
    # Jobs carry the operator's finalizer: delete them while it still runs, or the namespace never goes.
    k8s_cluster.kubectl("delete", "pipelinejobs", "--all", "-n", k8s_namespace, "--timeout=60s", check=False)
    op.stop()
