"""A seeded kill loop under `conveyor run`: SIGKILL of a rank or of `conveyor run` itself at random
moments, then a run to the end. Nothing is lost or repeated: an inference job's results are the
uninterrupted run's lines, byte for byte, each id once, in each writing layout (2 stages, 2 replicas
merging their parts, tensor parallel over gloo); a train job ends with the uninterrupted run's
weights and optimizer state, bit for bit; no process of the job outlives it.

CI runs a few kills per job (2 cores); CONVEYOR_KILLS=20 runs the loop the issue asked for (the jobs grow
with it, so that the kills land mid-run; `pytest -s` prints how many did).
The results' order in the file is completion order, which a restart changes, so lines are compared
as sorted lists. A random moment almost never lands inside the replicas' merge, which takes
milliseconds: test_kill_points.py kills there."""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conveyor.testing.tiny import save_tiny

from tests.conftest import ROOT
from tests.worker import kill_harness as harness

pytestmark = pytest.mark.integration
KILLS = int(os.environ.get("CONVEYOR_KILLS", "3"))
PROMPTS, STEPS = max(24, 8 * KILLS), max(40, 8 * KILLS)  # long enough for the kills to land mid-run


def kill_loop(job: Path, marker: str, kills: int, seed: int, length: float) -> list[str]:
    """``kills`` SIGKILLs, each at a seeded random moment after the ranks have started (loading, the
    rendezvous, generating or training, committing, merging): of `conveyor run` itself (then started
    again) or of one rank, of any replica (then `conveyor run` restarts the group, per restartPolicy). Then
    a run to the end. ``length`` is the uninterrupted run's: the first kill lands within its first 60 %,
    so at least one always does. Returns what was killed; a job that finished before its next kill ends
    the loop early."""
    rng, done, run = random.Random(seed), [], harness.start(job, marker)
    while len(done) < kills:
        harness.wait_for_ranks(run, marker)
        time.sleep(rng.uniform(0.1, 0.6) * length)
        ranks = harness.ranks(marker)
        if run.poll() is not None or not ranks:
            break  # finished: nothing left to interrupt
        if rng.random() < 0.3:
            harness.kill_conveyor_run(run, marker)
            done.append("conveyor run")
            run = harness.start(job, marker)
        else:
            victim = rng.choice(ranks)
            name = harness.rank_name(victim)
            os.kill(victim, signal.SIGKILL)
            done.append(name)
    harness.run_to_the_end(run, job, marker)
    return done


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("m") / "llama")


# The layouts whose writing differs: one writer per 2-stage group; 2 replicas, each writing its part
# (out.jsonl.rN) and the last to finish merging them; a tensor-parallel group over gloo.
LAYOUTS = {
    "2-stages": {"stages": 2},
    "2-replicas": {"stages": 2, "replicas": 2},
    "tensor-parallel-2": {"stages": 1, "tensorParallel": 2},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inference_kill_loop_loses_and_repeats_nothing(model: Path, tmp_path: Path, layout: str) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    for d in (reference, killed):
        d.mkdir()
    spec = harness.inference_spec(reference, model, PROMPTS, LAYOUTS[layout])
    length = harness.reference_run(harness.job_file(reference, spec), str(reference))

    spec = harness.inference_spec(killed, model, PROMPTS, LAYOUTS[layout])
    seed = 26 + list(LAYOUTS).index(layout)
    done = kill_loop(harness.job_file(killed, spec), str(killed), KILLS, seed=seed, length=length)
    print(f"inference kill loop ({layout}): {len(done)} kills landed: {done}")
    assert done  # at least one kill landed (a fast machine may finish before the last ones)
    assert harness.sorted_results(killed) == harness.sorted_results(reference)  # each once, byte-identical
    harness.assert_finished_cleanly(killed)


def _train_spec(tmp: Path) -> dict:
    shutil.copy(ROOT / "deploy" / "examples" / "train_tiny_transformer.py", tmp / "train.py")
    return {
        "mode": "train",
        "device": "cpu",
        "parallelism": {"stages": 2},
        "checkpoint": {"path": "ckpt", "every": 3, "keep": 2},
        "restartPolicy": {"backoffLimit": 100, "backoffSeconds": 0},
        "train": {
            "script": "train.py",
            "steps": STEPS,
            "config": {
                "train_micro_batch_size_per_gpu": 4,
                "gradient_accumulation_steps": 2,
                "optimizer": {"type": "AdamW", "params": {"lr": 0.003}},
                "steps_per_print": 100,
                "pipeline": {"schedule": "1f1b"},
            },
        },
    }


def _final_state(ckpt: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    name = (ckpt / "latest").read_text().strip()
    out = ckpt.parent / "final.pt"
    dcp_to_torch_save(ckpt / name, out)
    state = torch.load(out, weights_only=False)
    return {"step": name, "model": state["model"], "optimizer": state["optimizer"]}


def test_train_kill_loop_ends_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    for d in (reference, killed):
        d.mkdir()
    length = harness.reference_run(harness.job_file(reference, _train_spec(reference)), str(reference))
    want = _final_state(reference / "ckpt")

    done = kill_loop(
        harness.job_file(killed, _train_spec(killed)), str(killed), KILLS, seed=29, length=length
    )
    print(f"train kill loop: {len(done)} kills landed: {done}")
    assert done
    got = _final_state(killed / "ckpt")
    assert got["step"] == want["step"] == f"step-{STEPS}"
    for part in ("model", "optimizer"):
        assert got[part].keys() == want[part].keys()
        for key, value in want[part].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[part][key], value), (part, key)
            else:
                assert got[part][key] == value, (part, key)
