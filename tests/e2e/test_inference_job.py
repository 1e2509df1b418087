"""A tiny inference PipelineJob (2 stages x 2 tensor-parallel ranks, CPU) through the local cluster: its
output file must equal a single-process `conveyor run` of the same model and prompts, and the job must end
Succeeded with no duplicate or orphaned objects."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.cluster.fixtures import ROOT
from tests.conftest import conveyor_cmd, subprocess_env
from tests.e2e.host_volume import keep_on_the_host
from tests.e2e.test_train_job import wait_succeeded

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

EXAMPLES = ROOT / "deploy" / "examples"


def inference_job(name: str, model: Path, out: Path, stages: int, tp: int) -> dict:
    job = {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "PipelineJob",
        "metadata": {"name": name},
        "spec": {
            "mode": "inference",
            "device": "cpu",
            "model": {"path": str(model), "dtype": "float32"},
            "parallelism": {"stages": stages, "tensorParallel": tp, "replicas": 1},
            "resources": {"gpus": 0, "requests": {"cpu": "100m", "memory": "512Mi"}},
            "inference": {
                "input": str(EXAMPLES / "tiny-prompts.jsonl"),
                "output": str(out / "results.jsonl"),
                "maxNewTokens": 8,
                "batchSize": 2,
                "sampling": {"temperature": 0.0},
            },
            "checkpoint": {"path": str(out / "checkpoints"), "every": 2, "keep": 2},
            "restartPolicy": {"backoffLimit": 2, "backoffSeconds": 1},
        },
    }
    keep_on_the_host(job["spec"], out)
    return job


def results(path: Path) -> list[dict]:
    return sorted(
        (json.loads(line) for line in path.read_text().splitlines() if line.strip()), key=json.dumps
    )


def single_process_reference(tmp_path: Path) -> tuple[Path, Path]:
    """The example's tiny Llama, and the directory of a single-process `conveyor run` of the job on it."""
    model = tmp_path / "tiny-llama"
    env = subprocess_env()
    subprocess.run(
        conveyor_cmd()[:1] + [str(EXAMPLES / "make-tiny-llama.py"), str(model)], env=env, check=True
    )
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "job.yaml").write_text(yaml.safe_dump(inference_job("reference", model, reference, 1, 1)))
    subprocess.run(conveyor_cmd("run", str(reference / "job.yaml")), env=env, check=True, timeout=300)
    return model, reference


def test_inference_job_equals_a_single_process_run(k8s_cluster, k8s_namespace, operator, tmp_path):
    model, reference = single_process_reference(tmp_path)

    out = tmp_path / "cluster"
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(inference_job("tiny", model, out, 2, 2)))
    k8s_cluster.kubectl("apply", "-n", k8s_namespace, "-f", str(manifest))
    status = wait_succeeded(k8s_cluster, k8s_namespace, "tiny", operator)

    assert status["phase"] == "Succeeded"
    produced, expected = results(out / "results.jsonl"), results(reference / "results.jsonl")
    prompts = (EXAMPLES / "tiny-prompts.jsonl").read_text().splitlines()
    assert len(expected) == len([p for p in prompts if p.strip()]), "the reference answered every prompt"
    assert produced == expected
    # Inference: one StatefulSet per replica, `NAME-r0`; its Service is the job's name.
    sets = [s.metadata.name for s in k8s_cluster.apps.list_namespaced_stateful_set(k8s_namespace).items]
    assert sets == ["tiny-r0"]
    assert [s.metadata.name for s in k8s_cluster.core.list_namespaced_service(k8s_namespace).items] == [
        "tiny"
    ]
