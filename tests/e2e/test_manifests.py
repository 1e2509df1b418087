"""Every manifest we ship passes the API server's own validation: `kubectl apply --dry-run=server` of the
examples and kustomizations in deploy/ and of the chart rendered with each of its CI values files.

Objects of APIs this cluster does not serve (Argo CD, Flux, Prometheus operator) cannot be validated here;
the test names them instead of passing silently.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from tests.cluster.fixtures import ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

DEPLOY = ROOT / "deploy"
CHART = ROOT / "charts" / "conveyor"


def rendered_sources(cluster) -> dict[str, str]:
    """name -> multi-document YAML, for everything under deploy/ and each chart CI values file."""
    sources: dict[str, str] = {}
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if "kustomize" in path.parts:
            continue
        sources[str(path.relative_to(ROOT))] = path.read_text()
    for kustomization in sorted(DEPLOY.rglob("kustomization.yaml")):
        sources[f"kustomize {kustomization.parent.relative_to(ROOT)}"] = cluster.kubectl(
            "kustomize", str(kustomization.parent)
        ).stdout
    for value_file in sorted((CHART / "ci").glob("*.yaml")):
        sources[f"helm template ({value_file.name})"] = cluster.helm(
            "template", "conveyor", str(CHART), "--namespace", "conveyor-system", "-f", str(value_file)
        ).stdout
    return sources


def test_deploy_examples_and_rendered_chart_pass_server_side_dry_run(
    k8s_cluster, k8s_namespace, tmp_path: Path
):
    served = set(k8s_cluster.kubectl("api-versions").stdout.split())
    sources = {
        name: [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
        for name, text in rendered_sources(k8s_cluster).items()
    }
    # What must be there: a missing directory or a source that renders nothing would pass vacuously.
    # (A source may hold only a patch without a kind, as the Argo CD ConfigMap patch does.)
    assert any(name.startswith("deploy/examples/") for name in sources), sorted(sources)
    assert any(name.startswith("kustomize ") for name in sources), sorted(sources)
    assert any(name.startswith("helm template") for name in sources), sorted(sources)
    assert not [name for name, docs in sources.items() if not docs], "sources that render nothing"
    unserved, failures = [], []
    made_namespaces: list[str] = []
    for name, docs in sources.items():
        for doc in (d for d in docs if d.get("kind")):
            if doc.get("apiVersion") not in served:
                unserved.append(f"{name}: {doc['apiVersion']} {doc['kind']}")
                continue
            namespace = doc.get("metadata", {}).get("namespace")
            if namespace and namespace not in made_namespaces:
                # Manifests that name their namespace (the chart's release namespace, a team's) need it to exist.
                k8s_cluster.kubectl("create", "namespace", namespace, check=False)
                made_namespaces.append(namespace)
            manifest = tmp_path / "doc.yaml"
            manifest.write_text(yaml.safe_dump(doc))
            proc = k8s_cluster.kubectl(
                "apply", "--dry-run=server", "--server-side", "--field-manager=conveyor-test",
                "-n", namespace or k8s_namespace,
                "-f", str(manifest), check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                failures.append(
                    f"{name}: {doc['kind']} {doc.get('metadata', {}).get('name')}: {proc.stderr.strip()}"
                )
    for namespace in made_namespaces:
        k8s_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    assert not failures, "server-side dry run refused:\n" + "\n".join(failures)
    if unserved:
        warnings.warn(
            "not validated (API not served by the local cluster): " + "; ".join(unserved), stacklevel=1
        )
