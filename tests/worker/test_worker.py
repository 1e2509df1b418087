"""`conveyor worker` on failure: the termination message says what failed and what is committed, so the
operator's restart can say where the group resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conveyor.env import PodEnv, pod_environ
from conveyor.spec import parse_spec
from conveyor.worker import report_failure

from tests.conftest import subprocess_env


def _pod(spec: dict, **kw: object) -> PodEnv:
    env = pod_environ(
        job="j", spec=parse_spec(spec), replica=0, stage=0, master_addr="127.0.0.1", master_port=29500, **kw
    )
    return PodEnv.from_environ(env)


def test_a_failed_train_pod_reports_the_committed_checkpoint(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ckpt = tmp_path / "ckpt"
    for step in (8, 12):
        (ckpt / f"step-{step}").mkdir(parents=True)
        (ckpt / f"step-{step}" / ".metadata").write_bytes(b"")  # DCP's index: what a resume checks
    (ckpt / "latest").write_text("step-12\n")
    pod = _pod(
        {"mode": "train", "train": {"script": "/t.py"}, "checkpoint": {"path": str(ckpt)}},
        checkpoint_dir=str(ckpt),
    )
    log = tmp_path / "termination"
    monkeypatch.setenv("CONVEYOR_TERMINATION_LOG", str(log))
    report_failure(pod, "rank 1 exited with code 3")
    body = json.loads(log.read_text())
    assert body["completed"] is False and body["message"] == "rank 1 exited with code 3"
    assert body["lastCheckpoint"]["step"] == 12
    # `latest` names a checkpoint that is gone: the restart resumes from step-8, and says so.
    (ckpt / "step-12" / ".metadata").unlink()
    (ckpt / "step-12").rmdir()
    report_failure(pod, "rank 1 exited with code 3")
    assert json.loads(log.read_text())["lastCheckpoint"]["step"] == 8


def test_a_failed_inference_pod_reports_its_replicas_committed_results(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    spec = {
        "mode": "inference",
        "model": {"path": "/m"},
        "parallelism": {"replicas": 2},
        "inference": {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / "out.jsonl")},
    }
    (tmp_path / "out.jsonl.r0.progress.json").write_text(json.dumps({"committedBytes": 9, "completed": 4}))
    log = tmp_path / "termination"
    monkeypatch.setenv("CONVEYOR_TERMINATION_LOG", str(log))
    report_failure(_pod(spec), "rank 0 exited with code 1")
    assert json.loads(log.read_text())["lastCheckpoint"]["step"] == 4
    # Nothing committed yet: the failure is reported without progress.
    (tmp_path / "out.jsonl.r0.progress.json").unlink()
    report_failure(_pod(spec), "rank 0 exited with code 1")
    assert "lastCheckpoint" not in json.loads(log.read_text())


def test_the_worker_writes_the_message_when_a_rank_fails(tmp_path: Path) -> None:
    script = tmp_path / "fail.py"
    script.write_text("raise SystemExit(3)\n")
    ckpt = str(tmp_path / "c")
    spec = parse_spec({"mode": "train", "train": {"script": str(script)}, "checkpoint": {"path": ckpt}})
    env = pod_environ(job="j", spec=spec, replica=0, stage=0, master_addr="127.0.0.1", master_port=29500)
    log = tmp_path / "termination"
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor", "worker"],
        env=subprocess_env(
            **env, CONVEYOR_TERMINATION_LOG=str(log), CONVEYOR_CHECKPOINT_DIR=str(tmp_path / "c")
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    body = json.loads(log.read_text())
    assert body["completed"] is False and "code 3" in body["message"]


def test_ranks_die_with_a_killed_worker(tmp_path: Path) -> None:
    """A SIGKILL of `conveyor worker` cannot stop its ranks (each runs in its own process group): the
    kernel must (die_with_parent), or they would hold their GPUs and ports forever."""
    import os
    import signal
    import time

    pid_file = tmp_path / "rank.pid"
    script = tmp_path / "sleep.py"
    script.write_text(
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(300)\n"
    )
    ckpt = str(tmp_path / "c")
    spec = parse_spec({"mode": "train", "train": {"script": str(script)}, "checkpoint": {"path": ckpt}})
    env = pod_environ(job="j", spec=spec, replica=0, stage=0, master_addr="127.0.0.1", master_port=29500)
    worker = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "worker"],
        env=subprocess_env(**env, CONVEYOR_CHECKPOINT_DIR=ckpt),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        rank = int(pid_file.read_text())
        worker.kill()
        worker.wait()
        if not _exits_within(rank, 10):
            os.kill(rank, signal.SIGKILL)
            raise AssertionError(f"rank {rank} outlived its killed worker")
    finally:
        worker.kill()


def _exits_within(pid: int, seconds: float) -> bool:
    """The process is gone (or a zombie: dead, waiting for a reaper that may never come) in time."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            state = next(line for line in lines if line.startswith("State"))
        except (FileNotFoundError, ProcessLookupError):
            return True
        if "Z" in state.split()[1]:
            return True
        time.sleep(0.1)
    return False


def test_a_rank_whose_parent_died_before_it_started_exits(tmp_path: Path) -> None:
    """The supervisor can die while a rank is still importing (seconds): the rank must notice at once."""
    import os
    import signal

    pid_file = tmp_path / "child.pid"
    child = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(1.0)\n"
        "from conveyor.utils import die_with_parent\ndie_with_parent()\ntime.sleep(60)\n"
    )
    parent = (
        "import os, subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', {child!r}], env={{**os.environ, 'CONVEYOR_PARENT_PID': str(os.getpid())}})\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", parent], env=subprocess_env(), check=True, timeout=60)
    import time

    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    if not _exits_within(pid, 15):
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("a rank started by a parent that died already kept running")


def test_a_worker_without_its_environment_leaves_its_cause_and_exits_2(tmp_path: Path) -> None:
    """A pod rendered wrong (no CONVEYOR_* environment) is a bad job: exit 2 with the cause, which the
    operator's default failure rule turns into FailJob."""
    log = tmp_path / "termination"
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor", "worker"],
        env=subprocess_env(CONVEYOR_TERMINATION_LOG=str(log)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    body = json.loads(log.read_text())
    assert body["completed"] is False and body["cause"] and body["cause"] in proc.stderr


def test_a_serve_rank_gets_its_request_timeout_to_drain_others_ten_seconds() -> None:
    from conveyor.inference.serve import REQUEST_TIMEOUT_SECONDS
    from conveyor.spec import Mode
    from conveyor.worker import grace_seconds

    # a rolling update must not cut off a request in flight: the drain may take up to its timeout
    assert grace_seconds(Mode.SERVE, {}) == REQUEST_TIMEOUT_SECONDS
    assert grace_seconds(Mode.INFERENCE, {}) == grace_seconds(Mode.TRAIN, {}) == 10.0
    assert grace_seconds(Mode.SERVE, {"CONVEYOR_GRACE_SECONDS": "3"}) == 3.0
