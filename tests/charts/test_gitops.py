"""GitOps: the Argo CD Application and Flux HelmRelease point at the chart with values it accepts, and the
Argo CD health check (Lua, run in gopher-lua like Argo CD does) maps PipelineJob conditions to health."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.charts.conftest import of_kind, one
from tests.charts.helm import CACHE, CHART, ROOT

GITOPS = ROOT / "deploy" / "gitops"
HEALTH_LUA = GITOPS / "argocd" / "pipelinejob-health.lua"
LUAHEALTH_SRC = Path(__file__).parent / "luahealth"


def _release_values() -> dict[str, dict]:
    app = yaml.safe_load((GITOPS / "argocd" / "application.yaml").read_text())
    release = yaml.safe_load((GITOPS / "flux" / "helmrelease.yaml").read_text())
    return {"argocd": app["spec"]["source"]["helm"]["valuesObject"], "flux": release["spec"]["values"]}


def test_argocd_and_flux_point_at_the_chart():
    app = yaml.safe_load((GITOPS / "argocd" / "application.yaml").read_text())
    assert (ROOT / app["spec"]["source"]["path"] / "Chart.yaml").exists()
    assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
    release = yaml.safe_load((GITOPS / "flux" / "helmrelease.yaml").read_text())
    assert (ROOT / release["spec"]["chart"]["spec"]["chart"] / "Chart.yaml").exists()
    source = yaml.safe_load((GITOPS / "flux" / "gitrepository.yaml").read_text())
    assert release["spec"]["chart"]["spec"]["sourceRef"]["name"] == source["metadata"]["name"]
    chart_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert app["spec"]["source"]["targetRevision"] == source["spec"]["ref"]["tag"] == f"v{chart_version}"


@pytest.mark.parametrize("tool", ["argocd", "flux"])
def test_gitops_values_reach_the_rendered_chart(render, tool, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(_release_values()[tool]))
    manifests = render(values)
    # The releases run two operator pods (leader election) and scrape both the operator and the workers.
    assert one(manifests, "Deployment")["spec"]["replicas"] == 2
    assert len(of_kind(manifests, "ServiceMonitor")) == 1 and len(of_kind(manifests, "PodMonitor")) == 1
    assert of_kind(render(), "ServiceMonitor") == [], "the default values must differ from the releases'"


def test_argocd_cm_patch_carries_the_same_lua():
    patch = yaml.safe_load((GITOPS / "argocd" / "argocd-cm-patch.yaml").read_text())
    embedded = patch["data"]["resource.customizations.health.conveyor.dev_PipelineJob"]
    assert embedded == HEALTH_LUA.read_text()


@pytest.fixture(scope="module")
def luahealth() -> Path:
    """Build the gopher-lua runner (Argo CD's Lua interpreter) once; skip without Go."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain to build the gopher-lua runner for the Argo CD health check")
    out = CACHE / "k8s" / "bin" / "luahealth"
    env = dict(
        os.environ, GOMODCACHE=str(CACHE / "go" / "mod"), GOCACHE=str(CACHE / "go" / "cache"), CGO_ENABLED="0"
    )
    subprocess.run([go, "build", "-o", str(out), "."], cwd=LUAHEALTH_SRC, env=env, check=True, timeout=600)
    return out


def _job(conditions=None, *, generation=2, observed=2, suspend=False, mode="inference") -> dict:
    job: dict = {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "PipelineJob",
        "metadata": {"name": "j", "generation": generation},
        "spec": {"mode": mode, "suspend": suspend},
    }
    if conditions is not None:
        job["status"] = {
            "observedGeneration": observed,
            "conditions": [
                {"type": t, "status": s, "reason": r, "message": f"{t} {r}", "observedGeneration": observed}
                for t, s, r in conditions
            ],
        }
    return job


RUNNING = [("Ready", "True", "Running"), ("Reconciling", "False", "Idle"), ("Stalled", "False", "NotStalled")]
STARTING = [
    ("Ready", "False", "Starting"),
    ("Reconciling", "True", "Starting"),
    ("Stalled", "False", "NotStalled"),
]
FAILED = [
    ("Ready", "False", "BackoffLimitExceeded"),
    ("Reconciling", "False", "Idle"),
    ("Stalled", "True", "BackoffLimitExceeded"),
]
# A serve fleet rolling to a new spec (or draining a scale-down) keeps serving: Ready and Reconciling.
ROLLING = [
    ("Ready", "True", "Running"),
    ("Reconciling", "True", "RollingUpdate"),
    ("Stalled", "False", "NotStalled"),
]
SERVE_RESTARTING = [
    ("Ready", "False", "PodDeleted"),
    ("Reconciling", "True", "PodDeleted"),
    ("Stalled", "False", "NotStalled"),
]
CASES = {
    "no-status-yet": (_job(), "Progressing"),
    "serve-serving": (_job(RUNNING, mode="serve"), "Healthy"),
    "serve-rolling": (_job(ROLLING, mode="serve"), "Progressing"),
    "serve-group-restarting": (_job(SERVE_RESTARTING, mode="serve"), "Progressing"),
    "serve-stale-rollout": (_job(RUNNING, generation=4, observed=3, mode="serve"), "Progressing"),
    "running": (_job(RUNNING), "Healthy"),
    "starting": (_job(STARTING), "Progressing"),
    "failed": (_job(FAILED), "Degraded"),
    "stale-status": (_job(RUNNING, generation=3, observed=2), "Progressing"),
    "suspended": (_job(STARTING, suspend=True), "Suspended"),
}


def test_health_check_maps_conditions_to_argocd_health(luahealth, tmp_path):
    files = []
    for name, (job, _) in CASES.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(job))
        files.append(str(path))
    out = subprocess.run(
        [str(luahealth), str(HEALTH_LUA), *files], capture_output=True, text=True, timeout=60, check=True
    )
    results = [json.loads(line) for line in out.stdout.splitlines()]
    got = {name: r["status"] for name, r in zip(CASES, results)}
    assert got == {name: expected for name, (_, expected) in CASES.items()}
    failed = results[list(CASES).index("failed")]
    assert "BackoffLimitExceeded" in failed["message"]  # the reason reaches the Argo CD UI
    rolling = results[list(CASES).index("serve-rolling")]
    assert rolling["message"].startswith("RollingUpdate")


def test_health_check_follows_a_serve_rollout_as_the_operator_reports_it(luahealth, tmp_path):
    """Statuses the planner itself wrote while a fleet rolled: Healthy, Progressing during the rollout,
    Healthy again once it is done."""
    from conveyor.spec import parse_spec
    from conveyor_operator import render

    from tests.operator.test_fleet import fleet_spec, roll_to_end, running

    cluster = running(2)
    snapshots = {"before": json.loads(json.dumps(cluster.body))}
    new_spec = fleet_spec(2, image="conveyor:2")
    cluster.body["spec"] = new_spec
    cluster.body["metadata"]["generation"] = 2
    cluster.step()
    snapshots["rolling"] = json.loads(json.dumps(cluster.body))
    roll_to_end(cluster, render.template_hash(parse_spec(new_spec)), at_least=2)
    snapshots["done"] = json.loads(json.dumps(cluster.body))
    files = []
    for name, body in snapshots.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(body))
        files.append(str(path))
    out = subprocess.run(
        [str(luahealth), str(HEALTH_LUA), *files], capture_output=True, text=True, timeout=60, check=True
    )
    got = [json.loads(line)["status"] for line in out.stdout.splitlines()]
    assert got == ["Healthy", "Progressing", "Healthy"]
