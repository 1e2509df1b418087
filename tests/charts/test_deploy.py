"""deploy/: the examples validate against conveyor.spec, the Dockerfiles keep their invariants, the
kustomize base is the chart's output and its overlays build, the dashboard queries metrics that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conveyor import metrics as worker_metrics
from conveyor.spec import Mode, load_job

from tests.charts.helm import ROOT

DEPLOY = ROOT / "deploy"
EXAMPLES = sorted((DEPLOY / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_a_valid_pipelinejob(path):
    job = load_job(path)  # raises SpecError naming the field on any problem
    for doc in yaml.safe_load_all(path.read_text()):
        assert doc is None or {"apiVersion", "kind", "metadata"} <= doc.keys(), (
            f"{path.name}: incomplete object"
        )
    assert job.metadata.name == path.stem, f"{path.name}: name the file after its job"


def test_example_job_names_are_unique():
    # The e2e tier applies every example into one namespace.
    names = [load_job(p).metadata.name for p in EXAMPLES]
    assert len(names) == len(set(names))


def test_examples_cover_the_layouts_the_docs_promise():
    jobs = {p.name: load_job(p).spec for p in EXAMPLES}
    tiny = jobs["tiny-cpu-inference.yaml"]
    assert tiny.device == "cpu" and tiny.gpus_per_pod == 0 and tiny.parallelism.stages == 2
    big = jobs["llama-7b-inference.yaml"]
    assert (big.parallelism.stages, big.parallelism.tensor_parallel) == (2, 2)
    assert big.gpus_per_pod == 2 and big.model is not None and big.model.volume
    assert big.checkpoint is not None and big.checkpoint.volume  # progress survives a restart
    assert jobs["llama-7b-serve.yaml"].mode == Mode.SERVE


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize(
    ("name", "cmd"), [("operator", ["operator", "--all-namespaces"]), ("worker", ["worker"])]
)
def test_dockerfile_runs_conveyor_as_a_numeric_non_root_user(name, cmd):
    steps = _instructions(DEPLOY / f"Dockerfile.{name}")
    users = [args for op, args in steps if op == "USER"]
    assert users, f"Dockerfile.{name} never sets USER"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, (
        f"Dockerfile.{name}: final USER {users[-1]!r} must be a non-zero uid"
    )
    # The last USER comes after every RUN, so nothing later runs as root.
    last_user = max(i for i, (op, _) in enumerate(steps) if op == "USER")
    assert all(op != "RUN" for op, _ in steps[last_user:])
    (entrypoint,) = [json.loads(args) for op, args in steps if op == "ENTRYPOINT"]
    (default_cmd,) = [json.loads(args) for op, args in steps if op == "CMD"]
    assert entrypoint == ["conveyor"] and default_cmd == cmd
    froms = [args for op, args in steps if op == "FROM"]
    assert all(":latest" not in f for f in froms)
    assert any(
        "pip install" in args and args.rstrip().endswith(".") or " . " in args
        for op, args in steps
        if op == "RUN"
    )


def test_worker_image_is_built_on_nvidia_pytorch_and_keeps_its_torch():
    steps = _instructions(DEPLOY / "Dockerfile.worker")
    base = next(args for op, args in steps if op == "ARG" and args.startswith("BASE_IMAGE="))
    assert base.startswith("BASE_IMAGE=nvcr.io/nvidia/pytorch:")
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert "--no-deps ." in runs and "torch==" not in runs  # never replaces the CUDA build


def test_operator_image_has_no_torch():
    runs = " ".join(args for op, args in _instructions(DEPLOY / "Dockerfile.operator") if op == "RUN")
    assert "torch" not in runs and "--no-deps" in runs


def test_kustomize_base_is_the_charts_output():
    from tests.charts.kustomize_base import BASE, render

    assert BASE.read_text() == render(), (
        "deploy/kustomize/base is stale: python -m tests.charts.kustomize_base --write"
    )


def _kustomize(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with built-in kustomize) is not on PATH")
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "kustomize" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _deployment(objects: list[dict]) -> dict:
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    return deployment


def test_production_overlay_runs_two_operators_with_peering():
    objects = _kustomize("overlays/production")
    deployment = _deployment(objects)
    assert deployment["spec"]["replicas"] == 2
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--standalone" not in args and any(a.startswith("--peering=") for a in args)
    assert [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    assert [o for o in objects if o["kind"] == "ClusterKopfPeering"]


def test_dev_overlay_is_standalone_in_its_own_namespace():
    objects = _kustomize("overlays/dev")
    deployment = _deployment(objects)
    assert "--standalone" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    namespaced = [o for o in objects if o["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding")]
    assert {o["metadata"]["namespace"] for o in namespaced} == {"conveyor-dev"}
    (binding,) = [o for o in objects if o["kind"] == "ClusterRoleBinding"]
    assert binding["subjects"][0]["namespace"] == "conveyor-dev"
    assert binding["metadata"]["name"].endswith("-dev")  # no clash with a production install
    assert not [o for o in objects if o["kind"] == "ClusterKopfPeering"]


def _exposed_names(metric) -> set[str]:
    """The sample names a prometheus_client metric object exposes."""
    name = metric._name
    kind = metric._type
    if kind == "counter":
        return {f"{name}_total", f"{name}_created"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
    return {name}


def _known_metric_names(module) -> set[str]:
    from prometheus_client.metrics import MetricWrapperBase

    names: set[str] = set()
    for value in vars(module).values():
        if isinstance(value, MetricWrapperBase):
            names |= _exposed_names(value)
    return names


def test_dashboard_queries_only_metrics_that_exist():
    dashboard = json.loads((DEPLOY / "grafana" / "conveyor-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("tokens per second", "latency", "bubble", "restarts", "checkpoint age"):
        assert topic in titles
    used = {m for e in exprs for m in re.findall(r"\b(conveyor_[a-z_]+)\b", e)}
    known = _known_metric_names(worker_metrics)
    try:
        from conveyor_operator import metrics as operator_metrics

        known |= _known_metric_names(operator_metrics)
    except ImportError:  # the operator's metrics module lands separately; check its names once it does
        used = {m for m in used if not m.startswith("conveyor_operator_")}
    assert used - known == set(), f"the dashboard queries metrics nobody exports: {sorted(used - known)}"
    # Per-job panels select by the PodMonitor's target label, not the workers' clashing `job` label.
    assert all("pipelinejob" in e for e in exprs)
