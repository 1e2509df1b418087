"""Render deploy/kustomize/base/conveyor.yaml from the Helm chart, so that the two install paths never
drift apart: the kustomize base is the chart's default output, minus Helm's own labels.

    python -m tests.charts.kustomize_base --write
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from tests.charts.helm import CHART, ROOT, find_helm, helm

BASE = ROOT / "deploy" / "kustomize" / "base" / "conveyor.yaml"
NAMESPACE = "conveyor-system"
HEADER = """\
# Generated from charts/conveyor with its default values by `python -m tests.charts.kustomize_base --write`;
# do not edit (change the chart, then regenerate). CRDs are not here: apply crds/ first (docs/install.md).
"""


def _relabel(obj: dict[str, Any]) -> dict[str, Any]:
    """Helm's bookkeeping labels say nothing true about a kustomize install."""
    for meta in (obj.get("metadata", {}), obj.get("spec", {}).get("template", {}).get("metadata", {})):
        labels = meta.get("labels")
        if labels:
            labels.pop("helm.sh/chart", None)
            if labels.get("app.kubernetes.io/managed-by") == "Helm":
                labels["app.kubernetes.io/managed-by"] = "kustomize"
    return obj


def render() -> str:
    out = helm(find_helm(), "template", "conveyor", str(CHART), "--namespace", NAMESPACE).stdout
    objects = [_relabel(doc) for doc in yaml.safe_load_all(out) if doc]
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    docs = [yaml.safe_dump(o, sort_keys=False, default_flow_style=False) for o in [namespace, *objects]]
    return HEADER + "---\n" + "---\n".join(docs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {BASE.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        BASE.parent.mkdir(parents=True, exist_ok=True)
        BASE.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
