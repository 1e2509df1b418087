"""The Helm chart: lint and render over the values files in charts/conveyor/ci/, then check what a
platform team relies on (security context, probes, least-privilege RBAC per mode, monitors, peering)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.charts.conftest import of_kind, one
from tests.charts.helm import CHART, helm

CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
BAD_VALUES = sorted((Path(__file__).parent / "bad-values").glob("*.yaml"))
CI = {p.name.removesuffix("-values.yaml"): p for p in CI_VALUES}

CHILDREN = ["list", "create", "patch", "delete"]  # server-side apply: patch, and create for new objects
# What the operator calls on a job's namespaced objects (operator/conveyor_operator/k8s.py and kopf's
# watches); nothing else is granted.
JOB_RULES = {
    ("conveyor.dev", "pipelinejobs"): ["get", "list", "watch", "patch"],
    ("conveyor.dev", "pipelinejobs/status"): ["patch"],
    ("apps", "statefulsets"): CHILDREN,
    ("", "services"): CHILDREN,
    ("policy", "poddisruptionbudgets"): CHILDREN,
    ("scheduling.volcano.sh", "podgroups"): CHILDREN,
    ("", "pods"): ["list", "watch", "patch", "delete"],
    ("", "events"): ["create"],
}
CRD_RULES = {("apiextensions.k8s.io", "customresourcedefinitions"): ["list", "watch"]}
NAMESPACE_RULES = {("", "namespaces"): ["list", "watch"]}
PEERING_VERBS = ["list", "watch", "patch", "create"]


def rule_table(role: dict) -> dict[tuple[str, str], list[str]]:
    table: dict[tuple[str, str], list[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert (group, resource) not in table, (
                    f"{resource} granted twice in {role['metadata']['name']}"
                )
                table[(group, resource)] = rule["verbs"]
    return table


def operator_container(manifests: list[dict]) -> dict:
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_lint_passes(helm_bin, values):
    helm(helm_bin, "lint", str(CHART), "--strict", "--values", str(values))


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_operator_pod_is_locked_down(render, values):
    manifests = render(values)
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = operator_container(manifests)
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    # A read-only root still needs a writable /tmp for Python.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_probes_and_ports_match_the_operator_flags(render, values):
    container = operator_container(render(values))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert f"--metrics-port={ports['metrics']}" in container["args"]
    assert f"--health-port={ports['health']}" in container["args"]
    assert container["args"][0] == "operator"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_cluster_wide_mode_gets_one_least_privilege_cluster_role(render):
    manifests = render(CI["default"])
    assert "--all-namespaces" in operator_container(manifests)["args"]
    assert not of_kind(manifests, "Role")
    role = one(manifests, "ClusterRole")
    # No namespaces rule: kopf lists namespaces only when it watches a list of them.
    expected = {**JOB_RULES, **CRD_RULES, ("kopf.dev", "clusterkopfpeerings"): PEERING_VERBS}
    assert rule_table(role) == expected
    binding = one(manifests, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    sa = one(manifests, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "conveyor-system"}
    ]
    peering = one(manifests, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "conveyor"


def test_namespaced_mode_gets_a_role_per_namespace_and_only_reads_cluster_wide(render):
    manifests = render(CI["namespaced-ha"])
    args = operator_container(manifests)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--all-namespaces" not in args and "--standalone" not in args
    assert "--peering=conveyor" in args
    roles = of_kind(manifests, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert rule_table(role) == {**JOB_RULES, ("kopf.dev", "kopfpeerings"): PEERING_VERBS}
    bindings = of_kind(manifests, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    (cluster_role,) = of_kind(manifests, "ClusterRole")
    assert rule_table(cluster_role) == {
        **CRD_RULES,
        **NAMESPACE_RULES,
    }  # read-only, nothing about jobs or pods
    peerings = of_kind(manifests, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]
    assert not of_kind(manifests, "ClusterKopfPeering")


def test_two_replicas_with_peering_roll_one_at_a_time_on_different_nodes(render):
    manifests = render(CI["namespaced-ha"])
    deployment = one(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 1
    anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"] == (
        "kubernetes.io/hostname"
    )
    pdb = one(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


def test_standalone_single_namespace_has_no_cluster_rbac_and_never_overlaps(render):
    manifests = render(CI["standalone"])
    container = operator_container(manifests)
    assert "--standalone" in container["args"] and "--verbose" in container["args"]
    assert container["image"].endswith("@sha256:" + "0123456789abcdef" * 4)
    assert one(manifests, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert not of_kind(manifests, "ClusterRole") and not of_kind(manifests, "ClusterRoleBinding")
    (role,) = of_kind(manifests, "Role")
    assert role["metadata"]["namespace"] == "ml-jobs"
    assert rule_table(role) == JOB_RULES
    assert not of_kind(manifests, "KopfPeering")


def test_monitors_select_the_operator_service_and_the_worker_pods(render):
    manifests = render(CI["monitoring"])
    service = one(manifests, "Service")
    monitor = one(manifests, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    labels = service["metadata"]["labels"]
    assert all(labels[k] == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"] == "metrics"

    pod_monitor = one(manifests, "PodMonitor")
    # Worker pods carry these labels (docs/design.md); the operator's own pods do not match them.
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "conveyor",
        "app.kubernetes.io/managed-by": "conveyor-operator",
    }
    operator_labels = one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert "app.kubernetes.io/managed-by" not in operator_labels
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    endpoint = pod_monitor["spec"]["podMetricsEndpoints"][0]
    keep = next(r for r in endpoint["relabelings"] if r.get("action") == "keep")
    port_names = re.compile(f"^(?:{keep['regex']})$")  # Prometheus anchors relabel regexes
    assert port_names.match("metrics") and port_names.match("metrics-3")
    assert not port_names.match("rendezvous") and not port_names.match("health")
    targets = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"] if "targetLabel" in r}
    assert targets["pipelinejob"] == ["__meta_kubernetes_pod_label_conveyor_dev_job"]


def test_monitors_are_off_by_default(render):
    manifests = render(CI["default"])
    assert not of_kind(manifests, "ServiceMonitor") and not of_kind(manifests, "PodMonitor")


@pytest.mark.parametrize("values", BAD_VALUES, ids=lambda p: p.name)
def test_bad_values_are_refused_naming_the_field(helm_bin, values):
    expected = values.read_text().splitlines()[0].removeprefix("# expect:").strip()
    result = helm(helm_bin, "template", "conveyor", str(CHART), "--values", str(values), check=False)
    assert result.returncode != 0, f"{values.name} rendered but should be refused"
    assert expected in result.stderr, f"helm's error does not name {expected!r}:\n{result.stderr}"


def test_chart_crds_are_a_copy_of_the_generated_ones():
    generated = Path(CHART).parents[1] / "crds"
    chart_crds = CHART / "crds"
    names = sorted(p.name for p in generated.glob("*.yaml"))
    assert names, f"{generated} holds no CRD: run `conveyor crd --write`"
    assert sorted(p.name for p in chart_crds.glob("*.yaml")) == names, "the chart ships other CRDs than crds/"
    for source in sorted(generated.glob("*.yaml")):
        copy = chart_crds / source.name
        assert copy.exists(), f"{copy} is missing: run `conveyor crd --write`"
        assert copy.read_text() == source.read_text(), (
            f"{copy} differs from {source}: run `conveyor crd --write`"
        )
