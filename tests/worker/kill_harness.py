"""What the kill tests share (test_kill_loop.py: kills at seeded random moments; test_kill_points.py: kills
at named points of the commit protocol): jobs under `conveyor run`, found by a marker in their environment
(the test's directory), killed, restarted and run to the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import yaml

from tests.conftest import conveyor_cmd, subprocess_env


def env(marker: str = "", **extra: str) -> dict[str, str]:
    # one thread everywhere: float sums in one order, so interrupted and uninterrupted runs agree bit for bit
    return subprocess_env(KILL_LOOP_MARKER=marker, OMP_NUM_THREADS="1", **extra)


def job_file(tmp: Path, spec: dict) -> Path:
    doc = {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "PipelineJob",
        "metadata": {"name": "kill"},
        "spec": spec,
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def inference_spec(tmp: Path, model: Path, prompts: int, parallelism: dict) -> dict:
    """A seeded-sampling job over ``prompts`` rows (token ids and text) of ``tmp/in.jsonl``, every result
    committed."""
    rows = [
        {"id": i, "input_ids": [5 + i, 9, 11]}
        if i % 2
        else {"id": f"p{i}", "prompt": f"the quick brown fox {i}"}
        for i in range(prompts)
    ]
    (tmp / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "mode": "inference",
        "device": "cpu",
        "model": {"path": str(model), "dtype": "float32"},
        "parallelism": parallelism,
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


def sorted_results(directory: Path) -> list[bytes]:
    """The output's lines, sorted: their order is completion order, which a restart changes."""
    return sorted((directory / "out.jsonl").read_bytes().splitlines())


def assert_finished_cleanly(directory: Path) -> None:
    """Every progress record (the output's, or each replica's part's) says done, and no temporary file
    (of a record or a merge) is left behind."""
    records = sorted(directory.glob("out.jsonl*.progress.json"))
    assert records
    for record in records:
        assert json.loads(record.read_text())["done"] is True, record.name
    assert not sorted(p.name for p in directory.glob(".out.jsonl*")), "temporary files left behind"


def job_processes(marker: str) -> list[int]:
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


def ranks(marker: str) -> list[int]:
    found = []
    for pid in job_processes(marker):
        try:
            if b"conveyor.rank" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def rank_name(pid: int) -> str:
    """ "replica R rank N" of a rank process, from its environment (for the tests' account of their kills)."""
    try:
        pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    environ = dict(p.decode(errors="replace").partition("=")[::2] for p in pairs if b"=" in p)
    return f"replica {environ.get('CONVEYOR_REPLICA', '?')} rank {environ.get('RANK', '?')}"


def start(job: Path, marker: str, **extra_env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        conveyor_cmd("run", str(job), "--grace-seconds", "2"),
        env=env(marker, **extra_env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_for_ranks(run: subprocess.Popen[bytes], marker: str) -> None:
    deadline = time.monotonic() + 120
    while not ranks(marker) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def kill_conveyor_run(run: subprocess.Popen[bytes], marker: str) -> None:
    """SIGKILL of `conveyor run` itself: its workers and ranks die with it (PR_SET_PDEATHSIG)."""
    run.send_signal(signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 30
    while job_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not job_processes(marker), "processes outlived a killed `conveyor run`"


def reference_run(job: Path, marker: str) -> float:
    """Runs ``job`` uninterrupted; returns the seconds from its ranks' start to its end, which scale the
    kill loop's moments (a fixed window missed every run on a fast machine, or landed after it)."""
    run = start(job, marker)
    wait_for_ranks(run, marker)
    started = time.monotonic()
    assert run.wait(timeout=600) == 0
    return time.monotonic() - started


def run_to_the_end(run: subprocess.Popen[bytes] | None, job: Path, marker: str) -> None:
    """Let ``run`` finish (it restarts a killed rank's group itself), then one more run, which must
    succeed (at once, for a finished job) and leave no process behind."""
    if run is not None and run.poll() is None:
        run.wait(timeout=600)
    final = subprocess.run(
        conveyor_cmd("run", str(job)), env=env(marker), capture_output=True, text=True, timeout=600
    )
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert not job_processes(marker), "orphans left behind"
