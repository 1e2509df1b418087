"""The examples in deploy/examples/ run under `conveyor run`, so they never rot."""

import subprocess

import pytest
import yaml

from tests.conftest import ROOT, conveyor_cmd, subprocess_env

EXAMPLES = ROOT / "deploy" / "examples"


@pytest.mark.integration
def test_train_example_runs_and_a_restart_repeats_nothing(tmp_path):
    doc = yaml.safe_load((EXAMPLES / "train-tiny-transformer.yaml").read_text())
    doc["spec"]["train"]["script"] = str(EXAMPLES / doc["spec"]["train"]["script"])
    doc["spec"]["train"]["steps"] = 4
    doc["spec"]["checkpoint"].update(path=str(tmp_path / "ckpt"), every=2)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))

    first = subprocess.run(
        conveyor_cmd("run", str(job)), env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (tmp_path / "ckpt" / "latest").read_text().strip().endswith("4")
    assert "checkpoint committed" in first.stdout

    again = subprocess.run(
        conveyor_cmd("run", str(job), "--restart", "1"),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "train step" not in again.stdout  # resumed at the end: no step trained twice
