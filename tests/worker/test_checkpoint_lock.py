"""One run at a time in a checkpoint directory: a second process, and a second `conveyor run`, are refused
at their start naming the directory, the holder and the fix; a killed holder leaves no stale lock."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conveyor.checkpoint_lock import hold, release
from conveyor.commit_protocol import CheckpointError
from conveyor.failure import is_refusal

from tests.conftest import conveyor_cmd, subprocess_env

HOLDER = textwrap.dedent(
    """
    import sys, time
    from conveyor.checkpoint_lock import hold
    hold(sys.argv[1], job="first")
    print("held", flush=True)
    time.sleep(600)
    """
)


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"the first run ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_a_holder_on_its_way_out_is_waited_for(tmp_path):
    """A rank killed with its worker (the parent-death signal) dies just after it; `conveyor run` may
    restart the group at once (backoffSeconds 0): its new rank 0 was refused by the old one, for good."""
    ckpt = tmp_path / "ckpt"
    leaving = HOLDER.replace("time.sleep(600)", "time.sleep(1.5)")
    holder = subprocess.Popen(
        [sys.executable, "-c", leaving, str(ckpt)], env=subprocess_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        hold(ckpt, job="restart")
        assert holder.poll() == 0  # taken once the holder had gone, not from under it
    finally:
        release(ckpt)
        holder.kill()
        holder.wait()


def test_a_second_process_is_refused_until_the_holder_dies(tmp_path):
    ckpt = tmp_path / "ckpt"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(ckpt)], env=subprocess_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError) as err:
            hold(ckpt, job="second", wait_seconds=0.5)
        message = str(err.value)
        assert f"spec.checkpoint.path {ckpt} is in use by another run (pid {holder.pid} on " in message
        assert "(job first) holds conveyor.lock" in message
        assert "set spec.checkpoint.path to a directory of this run's own" in message
        assert is_refusal(err.value)  # exit 2: a restart would only be refused again
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no clean-up of any kind
        holder.wait()
    try:
        hold(ckpt, job="second")  # the kernel released the dead holder's lock: nothing stale
        hold(ckpt, job="second")  # held already by this process: not refused by itself
        assert "(job second)" in (ckpt / "conveyor.lock").read_text()
    finally:
        release(ckpt)


# A training script with no torch: says it started, then waits for the test's word.
WAITER = textwrap.dedent(
    """
    import os, pathlib, time
    here = pathlib.Path(__file__).parent
    (here / ("%s-rank%s.started" % (os.environ["CONVEYOR_JOB"], os.environ["RANK"]))).touch()
    while not (here / "go").exists():
        time.sleep(0.1)
    """
)


def _job(directory: Path, name: str, ckpt: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "wait.py").write_text(WAITER)
    spec = {
        "restartPolicy": {"backoffLimit": 3, "backoffSeconds": 1},
        "mode": "train",
        "device": "cpu",
        "parallelism": {"stages": 2},
        "checkpoint": {"path": str(ckpt)},
        "train": {"script": "wait.py", "steps": 1, "config": {"train_batch_size": 2}},
    }
    doc = {"apiVersion": "conveyor.dev/v1alpha1", "kind": "PipelineJob", "metadata": {"name": name}}
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump({**doc, "spec": spec}))
    return path


@pytest.mark.timeout(300)
def test_a_second_conveyor_run_on_the_directory_is_refused_before_it_starts(tmp_path):
    ckpt = tmp_path / "ckpt"
    first_job, second_job = _job(tmp_path / "a", "first", ckpt), _job(tmp_path / "b", "second", ckpt)
    first = subprocess.Popen(
        conveyor_cmd("run", str(first_job)),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(tmp_path / "a" / "first-rank0.started", first)
        second = subprocess.run(
            conveyor_cmd("run", str(second_job)),
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stdout + second.stderr  # refused, not restarted
        assert f"spec.checkpoint.path {ckpt} is in use by another run" in second.stderr
        assert "(job first) holds conveyor.lock" in second.stderr
        assert "restarting" not in second.stderr
        assert not (tmp_path / "b" / "second-rank0.started").exists()  # rank 0's script never ran
        assert first.poll() is None  # the first run goes on
    finally:
        (tmp_path / "a" / "go").touch()
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    (tmp_path / "b" / "go").touch()
    again = subprocess.run(
        conveyor_cmd("run", str(second_job)),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr  # the first run ended: its lock went with it
