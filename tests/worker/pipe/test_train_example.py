"""deploy/examples/train-tiny-transformer: its ranks (started here as `conveyor worker` would) train,
commit checkpoints, write the termination message, and exit at once when restarted after completion."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conveyor.spec import load_job, spec_to_json
from conveyor.utils import free_port

from tests.conftest import ROOT, subprocess_env

EXAMPLE = ROOT / "deploy" / "examples" / "train-tiny-transformer.yaml"


def _run_ranks(tmp_path, restart: int) -> list[subprocess.CompletedProcess]:
    job = load_job(EXAMPLE)
    spec = job.spec.model_copy(deep=True)
    spec.train.steps = 4
    spec.checkpoint.every = 2
    spec.train.config["gradient_accumulation_steps"] = 2
    spec.train.config["steps_per_print"] = 1
    port = free_port()
    procs = []
    for rank in range(2):
        env = subprocess_env(
            RANK=str(rank),
            LOCAL_RANK="0",
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            CONVEYOR_JOB="tiny",
            CONVEYOR_STAGES="2",
            CONVEYOR_SPEC=spec_to_json(spec),
            CONVEYOR_TRAIN_STEPS=str(spec.train.steps),
            CONVEYOR_TRAIN_CONFIG=json.dumps(spec.train.config),
            CONVEYOR_CHECKPOINT_DIR=str(tmp_path / "ckpt"),
            CONVEYOR_RESTART=str(restart),
            CONVEYOR_TERMINATION_LOG=str(tmp_path / f"termination-{rank}"),
            CONVEYOR_DIST_TIMEOUT="60",
        )
        script = EXAMPLE.parent / spec.train.script
        procs.append(
            subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE, text=True)
        )
    results = []
    for p in procs:
        _, err = p.communicate(timeout=240)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, "", err))
    return results


@pytest.mark.integration
@pytest.mark.timeout(500)
def test_example_trains_checkpoints_and_completes(tmp_path):
    first = _run_ranks(tmp_path, restart=0)
    assert [r.returncode for r in first] == [0, 0], first[0].stderr[-3000:] + first[1].stderr[-3000:]
    steps = [json.loads(line) for line in first[0].stderr.splitlines() if '"train step"' in line]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert steps[-1]["loss"] < steps[0]["loss"]
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "step-4"
    # conveyor.lock: the committing rank's, taken at its first save (one run per checkpoint directory)
    assert sorted(p.name for p in ckpt.iterdir()) == ["conveyor.lock", "latest", "step-2", "step-4"]
    message = json.loads((tmp_path / "termination-0").read_text())
    assert message["completed"] is True and message["lastCheckpoint"]["step"] == 4

    again = _run_ranks(tmp_path, restart=1)  # a StatefulSet restarts pods that exited 0
    assert [r.returncode for r in again] == [0, 0], again[0].stderr[-3000:]
    assert "job already complete" in again[0].stderr and '"train step"' not in again[0].stderr
    assert json.loads((tmp_path / "termination-1").read_text())["lastCheckpoint"]["step"] == 4
