"""An inference job whose output would die with its pods (the container's disk, an emptyDir) is reported
as InvalidSpec naming spec.inference.output and the fix: its results would be lost at every restart and
when the job ends, and the job would start again from its first prompt each time."""

from __future__ import annotations

from typing import Any

import pytest
from conveyor.spec import parse_spec
from conveyor_operator import k8s
from conveyor_operator.plan import JobView
from conveyor_operator.reconcile import plan_reconcile
from conveyor_operator.results_storage import results_lost_with_the_pod

from tests.operator.builders import at, inference_spec, job_body, serve_spec, train_spec

CLAIM = {"name": "results", "persistentVolumeClaim": {"claimName": "results"}}


def problems(output: str, **extra: Any) -> list[str]:
    spec = inference_spec(**extra)
    spec["inference"]["output"] = output
    return results_lost_with_the_pod(parse_spec(spec))


@pytest.mark.parametrize(
    ("output", "extra"),
    [
        ("/ckpt/out.jsonl", {}),  # on the checkpoint claim
        ("/ckpt/deeper/out.jsonl", {}),
        (
            "/results/out.jsonl",
            {
                "template": {
                    "volumes": [CLAIM],
                    "volumeMounts": [{"name": "results", "mountPath": "/results"}],
                }
            },
        ),
        # an emptyDir mounted under a claim's path holds only its own subtree
        (
            "/ckpt/out.jsonl",
            {
                "template": {
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                    "volumeMounts": [{"name": "tmp", "mountPath": "/ckpt/tmp"}],
                }
            },
        ),
        (
            "/node/out.jsonl",
            {
                "template": {
                    "volumes": [{"name": "node", "hostPath": {"path": "/srv"}}],
                    "volumeMounts": [{"name": "node", "mountPath": "/node"}],
                }
            },
        ),
    ],
    ids=["checkpoint claim", "below it", "template claim", "beside a deeper emptyDir", "hostPath"],
)
def test_results_on_a_volume_that_outlives_the_pod_are_fine(output: str, extra: dict) -> None:
    assert problems(output, **extra) == []


def test_the_container_disk_an_emptydir_and_a_read_only_mount_are_named_with_the_fix() -> None:
    (disk,) = problems("/work/out.jsonl")
    assert disk.startswith("spec.inference.output: '/work/out.jsonl' is on the container's own disk")
    assert "under checkpoint.path with checkpoint.volume" in disk
    # "/ckptx" is not under the checkpoint's "/ckpt": paths compare by parts, not by characters
    assert "container's own disk" in problems("/ckptx/out.jsonl")[0]
    (scratch,) = problems(
        "/scratch/out.jsonl",
        template={
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
        },
    )
    assert "is on the emptyDir volume 'scratch', which ends with the pod" in scratch
    (inside_model,) = problems("/models/out.jsonl")  # the model's claim, mounted read-only
    assert "read-only mount '/models'" in inside_model
    assert "is relative" in problems("out/results.jsonl")[0]


def test_a_checkpoint_path_without_its_claim_is_the_container_disk() -> None:
    spec = inference_spec(checkpoint={"path": "/ckpt"})  # conveyor run's spec: no volume to mount
    assert "container's own disk" in results_lost_with_the_pod(parse_spec(spec))[0]


def test_serve_and_train_jobs_have_no_output_to_keep() -> None:
    assert results_lost_with_the_pod(parse_spec(serve_spec())) == []
    assert results_lost_with_the_pod(parse_spec(train_spec())) == []


def test_the_reconcile_reports_invalid_spec_and_applies_nothing() -> None:
    spec = inference_spec()
    spec["inference"]["output"] = "/tmp/out.jsonl"
    plan = plan_reconcile(JobView.from_body(job_body(spec)), [], at(0))
    status = k8s.status_patch(plan.status)
    assert plan.apply == [] and (status["phase"], status["reason"]) == ("Failed", "InvalidSpec")
    assert status["message"].startswith("spec.inference.output: '/tmp/out.jsonl' is on the container's own")
