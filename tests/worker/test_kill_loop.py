"""A seeded kill loop under `conveyor run`: SIGKILL of a rank or of `conveyor run` itself at random
moments, then a run to the end. Nothing is lost or repeated: an inference job's results are the
uninterrupted run's lines, byte for byte, each id once; a train job ends with the uninterrupted run's
weights and optimizer state, bit for bit; no process of the job outlives it.

CI runs a few kills per job (2 cores); CONVEYOR_KILLS=20 runs the loop the issue asked for (the jobs grow
with it, so that the kills land mid-run; `pytest -s` prints how many did).
The results' order in the file is completion order, which a restart changes, so lines are compared
as sorted lists."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from conveyor.testing.tiny import save_tiny

from tests.conftest import ROOT, conveyor_cmd, subprocess_env

pytestmark = pytest.mark.integration
KILLS = int(os.environ.get("CONVEYOR_KILLS", "3"))
PROMPTS, STEPS = max(24, 8 * KILLS), max(40, 8 * KILLS)  # long enough for the kills to land mid-run


def _env(marker: str = "") -> dict[str, str]:
    # one thread everywhere: float sums in one order, so interrupted and uninterrupted runs agree bit for bit
    return subprocess_env(KILL_LOOP_MARKER=marker, OMP_NUM_THREADS="1")


def _job_file(tmp: Path, spec: dict) -> Path:
    doc = {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "PipelineJob",
        "metadata": {"name": "kill"},
        "spec": spec,
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _job_processes(marker: str) -> list[int]:
    """Live processes whose environment names ``marker`` (this test's directory): the job's."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _ranks(marker: str) -> list[int]:
    ranks = []
    for pid in _job_processes(marker):
        try:
            if b"conveyor.rank" in Path(f"/proc/{pid}/cmdline").read_bytes():
                ranks.append(pid)
        except OSError:
            continue
    return ranks


def _start(job: Path, marker: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        conveyor_cmd("run", str(job), "--grace-seconds", "2"),
        env=_env(marker),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait_for_ranks(run: subprocess.Popen[bytes], marker: str) -> None:
    deadline = time.monotonic() + 120
    while not _ranks(marker) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def reference_run(job: Path, marker: str) -> float:
    """Runs ``job`` uninterrupted; returns the seconds from its ranks' start to its end, which scale the
    kill loop's moments (a fixed window missed every run on a fast machine, or landed after it)."""
    run = _start(job, marker)
    _wait_for_ranks(run, marker)
    started = time.monotonic()
    assert run.wait(timeout=600) == 0
    return time.monotonic() - started


def kill_loop(job: Path, marker: str, kills: int, seed: int, length: float) -> list[str]:
    """``kills`` SIGKILLs, each at a seeded random moment after the ranks have started (loading, the
    rendezvous, generating or training, committing): of `conveyor run` itself (then started again) or of
    one rank (then `conveyor run` restarts the group, per restartPolicy). Then a run to the end.
    ``length`` is the uninterrupted run's: the first kill lands within its first 60 %, so at least one
    always does. Returns what was killed; a job that finished before its next kill ends the loop early."""
    rng, done, run = random.Random(seed), [], _start(job, marker)
    while len(done) < kills:
        _wait_for_ranks(run, marker)
        time.sleep(rng.uniform(0.1, 0.6) * length)
        ranks = _ranks(marker)
        if run.poll() is not None or not ranks:
            break  # finished: nothing left to interrupt
        if rng.random() < 0.3:
            run.send_signal(signal.SIGKILL)
            run.wait()
            done.append("conveyor run")
            deadline = time.monotonic() + 30
            while _job_processes(marker) and time.monotonic() < deadline:
                time.sleep(0.1)  # its workers and ranks die with it (PR_SET_PDEATHSIG)
            assert not _job_processes(marker), "processes outlived a killed `conveyor run`"
            run = _start(job, marker)
        else:
            os.kill(rng.choice(ranks), signal.SIGKILL)
            done.append("rank")
    if run.poll() is None:
        run.wait(timeout=600)
    final = subprocess.run(
        conveyor_cmd("run", str(job)), env=_env(marker), capture_output=True, text=True, timeout=600
    )
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert not _job_processes(marker), "orphans left behind"
    return done


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("m") / "llama")


def _inference_spec(tmp: Path, model: Path) -> dict:
    rows = [
        {"id": i, "input_ids": [5 + i, 9, 11]}
        if i % 2
        else {"id": f"p{i}", "prompt": f"the quick brown fox {i}"}
        for i in range(PROMPTS)
    ]
    (tmp / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "mode": "inference",
        "device": "cpu",
        "model": {"path": str(model), "dtype": "float32"},
        "parallelism": {"stages": 2},
        "checkpoint": {"path": str(tmp / "ckpt"), "every": 1},
        "restartPolicy": {"backoffLimit": 100, "backoffSeconds": 0},
        "inference": {
            "input": "in.jsonl",  # relative to the job file
            "output": "out.jsonl",
            "maxNewTokens": 8,
            "batchSize": 2,
            "sampling": {"temperature": 0.7, "seed": 3},
        },
    }


def test_inference_kill_loop_loses_and_repeats_nothing(model: Path, tmp_path: Path) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    for d in (reference, killed):
        d.mkdir()
    length = reference_run(_job_file(reference, _inference_spec(reference, model)), str(reference))
    want = sorted((reference / "out.jsonl").read_bytes().splitlines())

    done = kill_loop(
        _job_file(killed, _inference_spec(killed, model)), str(killed), KILLS, seed=26, length=length
    )
    got = sorted((killed / "out.jsonl").read_bytes().splitlines())
    print(f"inference kill loop: {len(done)} kills landed: {done}")
    assert done  # at least one kill landed (a fast machine may finish before the last ones)
    assert got == want  # every result once, each line byte-identical
    assert json.loads((killed / "out.jsonl.progress.json").read_text())["done"] is True


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
    length = reference_run(_job_file(reference, _train_spec(reference)), str(reference))
    want = _final_state(reference / "ckpt")

    done = kill_loop(_job_file(killed, _train_spec(killed)), str(killed), KILLS, seed=27, length=length)
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
