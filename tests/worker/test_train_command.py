"""spec.train.command: every rank runs the user's program with the rendezvous environment torchrun and
DeepSpeed's launcher set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
besides Conveyor's own; its exit code is the rank's. Started as the operator starts pods (`conveyor
worker` per pod)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conveyor.env import pod_environ
from conveyor.spec import parse_spec
from conveyor.utils import free_port

from tests.conftest import conveyor_cmd, subprocess_env

pytestmark = pytest.mark.integration
NAMES = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]
NAMES += ["CONVEYOR_TRAIN_STEPS", "CONVEYOR_CHECKPOINT_DIR", "CONVEYOR_TRAIN_CONFIG", "CONVEYOR_RESTART"]
PROGRAM = (
    "import json, os, sys; "
    "open(os.path.join(sys.argv[1], 'env-' + os.environ['RANK']), 'w').write("
    "json.dumps({n: os.environ.get(n) for n in sys.argv[3:]})); sys.exit(int(sys.argv[2]))"
)


def run_pods(tmp_path, exit_code: int) -> list[int]:
    spec = parse_spec(
        {
            "mode": "train",
            "device": "cpu",
            "parallelism": {"stages": 2, "replicas": 2},
            "checkpoint": {"path": str(tmp_path / "ckpt")},
            "train": {
                "command": [sys.executable, "-c", PROGRAM],
                "args": [str(tmp_path), str(exit_code), *NAMES],
                "steps": 7,
                "config": {"train_batch_size": 8},
            },
        }
    )
    port, procs = free_port(), []
    for replica in range(2):
        for stage in range(2):
            env = pod_environ(
                job="cmd", spec=spec, replica=replica, stage=stage, master_addr="127.0.0.1", master_port=port
            )
            procs.append(
                subprocess.Popen(conveyor_cmd("worker"), env=subprocess_env(**env, CONVEYOR_METRICS_PORT="0"))
            )
    return [p.wait(timeout=120) for p in procs], port


@pytest.mark.timeout(300)
def test_every_rank_gets_the_rendezvous_environment(tmp_path):
    codes, port = run_pods(tmp_path, 0)
    assert codes == [0, 0, 0, 0]
    for rank in range(4):
        env = json.loads((tmp_path / f"env-{rank}").read_text())
        assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "4"
        assert env["LOCAL_RANK"] == "0" and env["LOCAL_WORLD_SIZE"] == "1"
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == str(port)
        assert env["CONVEYOR_TRAIN_STEPS"] == "7" and env["CONVEYOR_CHECKPOINT_DIR"] == str(tmp_path / "ckpt")
        assert json.loads(env["CONVEYOR_TRAIN_CONFIG"]) == {"train_batch_size": 8}
        assert env["CONVEYOR_RESTART"] == "0"  # the group's restart count, as scripts see it


@pytest.mark.timeout(300)
def test_the_programs_exit_code_fails_the_pod(tmp_path):
    codes, _ = run_pods(tmp_path, 3)
    assert all(code == 3 for code in codes), codes


@pytest.mark.timeout(120)
def test_a_program_that_stops_making_progress_turns_its_rank_not_live(tmp_path):
    """hangTimeoutSeconds covers a training command too: the program's engine beats in its own process,
    and the rank's /live (the liveness probe) sees those beats, then their silence. The rank's /metrics
    serves the program's metrics."""
    import time

    from tests.worker.test_readiness import get

    started = tmp_path / "beating"
    program = (
        "import sys, time; from conveyor import metrics; from conveyor.watchdog import PROGRESS; "
        "metrics.LOSS.labels('cmd').set(0.5); metrics.export_to_rank(); PROGRESS.beat(); "  # as a step ends
        "open(sys.argv[1], 'w').close(); time.sleep(120)"  # one step, then it hangs
    )
    spec = parse_spec(
        {
            "mode": "train",
            "device": "cpu",
            "checkpoint": {"path": str(tmp_path / "ckpt")},
            "train": {"command": [sys.executable, "-c", program], "args": [str(started)], "steps": 1},
        }
    )
    env = pod_environ(
        job="cmd", spec=spec, replica=0, stage=0, master_addr="127.0.0.1", master_port=free_port()
    )
    port = free_port()
    # CONVEYOR_HANG_TIMEOUT is what the operator sets from hangTimeoutSeconds (at least 10 s there)
    pod = subprocess.Popen(
        conveyor_cmd("worker"),
        env=subprocess_env(**env, CONVEYOR_METRICS_PORT=str(port), CONVEYOR_HANG_TIMEOUT="2"),
    )
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert pod.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        while (answer := get(port, "/live"))[0] == 200:  # live until 2 s pass without a beat
            assert time.monotonic() < deadline, "the program's silence never reached the probe"
            time.sleep(0.5)
        assert answer[0] == 503 and answer[1].startswith("hung: no progress for")
        assert 'conveyor_loss{job="cmd"} 0.5' in get(port, "/metrics")[1]  # the program's, served by its rank
    finally:
        pod.terminate()
        pod.wait(timeout=30)


def test_the_hand_off_folders_of_ranks_no_longer_running_are_swept(tmp_path, monkeypatch):
    """A rank stopped by a signal leaves its folder behind; the next rank on the machine removes the
    folders of pids that no longer run, and leaves those of running ranks alone."""
    from conveyor import rank

    monkeypatch.setattr(rank.tempfile, "tempdir", str(tmp_path))
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        left = tmp_path / f"{rank.HANDOFF_PREFIX}{ended.pid}-abc"
        live = tmp_path / f"{rank.HANDOFF_PREFIX}{running.pid}-def"
        other = tmp_path / f"{rank.HANDOFF_PREFIX}notapid-ghi"  # not one of ours: kept
        for folder in (left, live, other):
            folder.mkdir()
            (folder / "beats").touch()
        with rank.child_handoff_dir() as handoff:
            assert Path(handoff).name.startswith(f"{rank.HANDOFF_PREFIX}{os.getpid()}-")
            assert not left.exists()
            assert live.exists() and other.exists()
        assert not Path(handoff).exists()
    finally:
        running.kill()
        running.wait()
