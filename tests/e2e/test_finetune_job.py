"""A fine-tuning PipelineJob (a tiny random Llama, 2 stages, CPU) through the local cluster, with a rank
process killed after a committed checkpoint: the operator restarts the group, the job resumes from that
checkpoint and ends Succeeded, every logged step's loss is HF's single-process loss for that step (the
curve goes on where it left off), and the export is the model HF's own training makes. Then the same with
the latest checkpoint truncated while the group restarts (a torn write, a full disk): the group skips
it, says so, and resumes from the one before, with the same result."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conveyor.commit_protocol import latest
from conveyor.testing.tiny import save_tiny

from tests.cluster.waiting import wait_for
from tests.e2e.test_train_job import rank_pids, wait_succeeded
from tests.worker.train.reference import STEPS, hf_train, spec_dict, write_dataset

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

NAME = "finetune"


def committed_step(ckpt: Path) -> int:
    """The step of the newest committed checkpoint (0 before the first commit)."""
    committed = latest(ckpt) if ckpt.exists() else None
    return committed.step or 0 if committed is not None else 0


def logged_losses(log: str) -> list[tuple[int, float]]:
    """(step, loss) of every "fine-tune step" record, both incarnations of the group included."""
    out = []
    for line in log.splitlines():
        if '"fine-tune step"' in line:
            record = json.loads(line[line.index("{") :])
            out.append((record["step"], record["loss"]))
    return out


def truncate_a_file(checkpoint: Path) -> str:
    """Cut the checkpoint's largest file in half; returns its name."""
    victim = max((f for f in checkpoint.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    return victim.name


@pytest.mark.parametrize("latest_truncated", [False, True], ids=["killed", "killed-and-truncated"])
def test_finetune_job_resumes_after_a_killed_rank_on_the_same_curve(
    k8s_cluster, k8s_namespace, operator, tmp_path, latest_truncated
):
    model = save_tiny("llama", tmp_path / "model")
    data = write_dataset(tmp_path / "data.jsonl")
    reference, trained = hf_train(model, data)
    spec = spec_dict(model, data, Path("/checkpoints"), stages=2, replicas=1)
    spec["checkpoint"]["volume"] = "work"  # a train job resumes from a claim; the agent maps it here:
    ckpt = k8s_cluster.dir / "agent" / "pvc" / k8s_namespace / "work"
    spec["resources"] = {"gpus": 0, "requests": {"cpu": "100m", "memory": "512Mi"}}
    spec["restartPolicy"] = {"backoffLimit": 3, "backoffSeconds": 1}
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "work"},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    job = {"apiVersion": "conveyor.dev/v1alpha1", "kind": "PipelineJob", "metadata": {"name": NAME}}
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump_all([claim, {**job, "spec": spec}]))
    k8s_cluster.kubectl("apply", "-n", k8s_namespace, "-f", str(manifest))

    first = 10 if latest_truncated else 5  # (checkpoints every 5 steps, the last 2 kept)
    wait_for(lambda: committed_step(ckpt) >= first, f"checkpoint step {first}", timeout=300, interval=0.1)
    pids = wait_for(lambda: rank_pids(k8s_namespace, NAME), "the job's rank processes")
    os.kill(pids[-1], signal.SIGKILL)  # the others fail on the lost rank: nothing commits after this
    killed_after = committed_step(ckpt)
    assert killed_after < STEPS, "the run ended before the kill: nothing to resume"
    if latest_truncated:
        truncated = truncate_a_file(latest(ckpt).path)  # type: ignore[union-attr]
    status = wait_succeeded(k8s_cluster, k8s_namespace, NAME, operator, timeout=400)

    restarts = sum(g.get("restarts", 0) for g in status.get("groups", []))
    if restarts != 1:  # say why each restart happened: the operator's events name the failure
        events = k8s_cluster.kubectl("get", "events", "-n", k8s_namespace, check=False).stdout
        pytest.fail(f"{restarts} restarts for one kill\nevents:\n{events}\n{json.dumps(status, indent=1)}")
    log = k8s_cluster.pod_logs(k8s_namespace, f"{NAME}-0") + k8s_cluster.pod_logs(k8s_namespace, f"{NAME}-1")
    losses = logged_losses(log)
    assert {step for step, _ in losses} == set(range(1, STEPS + 1)), losses
    resumed = [
        json.loads(line[line.index("{") :]) for line in log.splitlines() if '"checkpoint loaded"' in line
    ]
    assert resumed and resumed[0]["step"] >= 5, resumed  # the new group resumed, it did not start over
    if latest_truncated:
        assert resumed[0]["step"] == killed_after - 5, resumed  # the one before the truncated one
        skipped = f"skipped step-{killed_after} (named by latest, "
        assert skipped in log and truncated in log, log[-3000:]  # it says what it skipped, and why
        # ...and the operator shows it in status, counted once, naming the checkpoint and the damage
        last = status["lastCheckpoint"]
        assert last.get("skipped") == 1, json.dumps(status, indent=1)
        assert (
            last["lastSkipped"]["name"] == f"step-{killed_after}"
            and truncated in last["lastSkipped"]["reason"]
        )
    else:
        assert resumed[0]["step"] == killed_after, resumed
    for step, loss in losses:  # the first incarnation, the repeated steps after the resume, the rest
        assert loss == pytest.approx(reference[step - 1], rel=2e-4, abs=2e-4), step

    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(ckpt / "export"), dtype=torch.float32).eval()
    x = torch.tensor([[5, 17, 99, 230, 41, 8, 77]])
    with torch.no_grad():
        want, got = trained.eval()(x).logits, exported(x).logits
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
