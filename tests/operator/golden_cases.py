"""Rendering cases whose manifests are checked in under tests/operator/golden/ (one YAML per case).

Regenerate after an intended change of the manifests, then review the diff:
    python tests/operator/golden_cases.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

if __name__ == "__main__":  # run as a script from any directory
    root = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(root / "worker"), str(root / "operator"), str(root)]

from conveyor.spec import parse_spec  # noqa: E402
from conveyor_operator import render  # noqa: E402

from tests.operator.builders import inference_spec, serve_spec, train_spec  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden"
JOB = render.JobRef(name="llm", namespace="ml", uid="0b8c5a2e-0000-4000-8000-000000000001")

CASES: dict[str, tuple[dict[str, Any], dict[str, int], bool]] = {
    # name: (spec, restarts per group, running)
    "inference-p2-t1-r2": (inference_spec(stages=2, tp=1, replicas=2), {"llm-r1": 3}, True),
    "inference-p4-t2-r1-cpu": (
        inference_spec(stages=4, tp=2, replicas=1, device="cpu", image="conveyor:dev"),
        {},
        True,
    ),
    "inference-suspended": (inference_spec(stages=2, replicas=1, suspend=True), {}, False),
    "serve-p2-t2-r2": (
        serve_spec(
            stages=2,
            tp=2,
            replicas=2,
            template={
                "nodeSelector": {"gpu": "h200"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "priorityClassName": "high",
                "env": [{"name": "NCCL_DEBUG", "value": "WARN"}],
                "imagePullSecrets": [{"name": "regcred"}],
            },
        ),
        {},
        True,
    ),
    "train-p2-t1-r2": (train_spec(stages=2, tp=1, replicas=2, resources={"gpus": 2}), {"llm": 1}, True),
    "inference-placement-volcano-kueue": (
        inference_spec(
            stages=2,
            replicas=2,
            template={"schedulerName": "volcano"},
            placement={
                "topologyKey": "example.com/nvlink-domain",
                "exclusive": True,
                "queueName": "team-a",
            },
        ),
        {},
        True,
    ),
}


def render_case(name: str) -> list[dict[str, Any]]:
    spec_doc, restarts, running = CASES[name]
    return render.build_all(JOB, parse_spec(spec_doc), restarts, running=running)


def dump(objects: list[dict[str, Any]]) -> str:
    return "---\n".join(yaml.safe_dump(o, sort_keys=False, width=110) for o in objects)


def main() -> None:
    GOLDEN.mkdir(exist_ok=True)
    for name in CASES:
        (GOLDEN / f"{name}.yaml").write_text(dump(render_case(name)))
        print(f"wrote {GOLDEN / name}.yaml")


if __name__ == "__main__":
    main()
