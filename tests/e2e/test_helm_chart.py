"""The Helm chart on the local cluster: `helm install`, `helm upgrade`, the operator it installs (a pod,
talking to the API server with its own service account and the chart's RBAC) running the same job as
test_train_job.py, and `helm uninstall` removing everything it installed."""

from __future__ import annotations

import json

import pytest

from tests.cluster.fixtures import ROOT
from tests.cluster.waiting import wait_for
from tests.e2e.test_train_job import (
    STAGES,
    TP,
    assert_clean_children,
    reference_results,
    submit,
    wait_succeeded,
)

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

CHART = ROOT / "charts" / "conveyor"
OPERATOR_PODS = "app.kubernetes.io/name=conveyor,app.kubernetes.io/component=operator"


def operator_pods(cluster, namespace: str) -> list:
    return cluster.core.list_namespaced_pod(namespace, label_selector=OPERATOR_PODS).items


def running_operator(cluster, namespace: str):
    pods = [p for p in operator_pods(cluster, namespace) if p.metadata.deletion_timestamp is None]
    return len(pods) == 1 and pods[0].status.phase == "Running" and pods[0]


def test_chart_install_upgrade_job_and_uninstall(k8s_cluster, k8s_namespace, tmp_path):
    ns = k8s_namespace
    # The operator watches only this test's namespace (a Role, not a ClusterRole) and runs standalone.
    settings = ["--set", f"watch.namespaces={{{ns}}}", "--set", "leaderElection.enabled=false"]
    k8s_cluster.helm("install", "conveyor", str(CHART), "-n", ns, "--skip-crds", *settings)
    first = wait_for(lambda: running_operator(k8s_cluster, ns), "the chart's operator pod to run", timeout=60)

    k8s_cluster.helm(
        "upgrade", "conveyor", str(CHART), "-n", ns, "--reuse-values", "--set", "operator.verbose=true"
    )
    history = json.loads(k8s_cluster.helm("history", "conveyor", "-n", ns, "-o", "json").stdout)
    assert [h["revision"] for h in history] == [1, 2] and history[-1]["status"] == "deployed"
    # The changed pod template rolls the Deployment: a new operator pod replaces the first.
    second = wait_for(
        lambda: (p := running_operator(k8s_cluster, ns)) and p.metadata.uid != first.metadata.uid and p,
        "the upgraded operator pod",
        timeout=90,
    )
    assert "--verbose" in second.spec.containers[0].args

    results = submit(k8s_cluster, ns, "helmjob", tmp_path)
    wait_succeeded(k8s_cluster, ns, "helmjob", None)
    assert json.loads(results.read_text()) == reference_results(STAGES * TP)
    assert_clean_children(k8s_cluster, ns, "helmjob", ignore_pods=OPERATOR_PODS)
    # Jobs carry the operator's finalizer: delete them while the operator still runs.
    k8s_cluster.kubectl("delete", "pipelinejobs", "--all", "-n", ns, "--timeout=60s")

    k8s_cluster.helm("uninstall", "conveyor", "-n", ns, "--wait", "--timeout=60s")
    left = k8s_cluster.kubectl(
        "get", "deployments,serviceaccounts,roles,rolebindings,services", "-n", ns,
        "-l", "app.kubernetes.io/instance=conveyor", "-o", "name",
    ).stdout.split()  # fmt: skip
    assert left == []
    wait_for(lambda: not operator_pods(k8s_cluster, ns), "the operator pod to go", timeout=60)
