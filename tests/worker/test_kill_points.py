"""SIGKILLs at named points of a 2-replica batch job's end under `conveyor run` (stop_points.py): after a
replica's last commit, while the last replica to finish merges the parts into the output (its temporary
file written, not yet in place), and after the merge (the output in place, the rank not yet done). At each
point a rank stops itself, and the test kills it, another rank of the group, or `conveyor run`; then runs
the job to the end. The outcome is the uninterrupted run's: every line once, byte for byte, each part's
record done, no temporary file left. (The parts stay beside the output: nothing removes them.)

CI runs a few cases (2 cores); CONVEYOR_KILLS above 3 runs every point with every target."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conveyor.stop_points import MERGE_REPLACED, MERGE_WRITTEN, RESULTS_DONE
from conveyor.testing.tiny import save_tiny

from tests.worker import kill_harness as harness

pytestmark = pytest.mark.integration
PROMPTS = 8
LAYOUT = {"stages": 2, "replicas": 2}  # 4 ranks: a replica's writer (stage 0) and its stage 1
TARGETS = ("stopped rank", "other rank", "conveyor run")
FEW = [  # (a case is three start-ups of 4 ranks, about 30 s here)
    (MERGE_WRITTEN, "stopped rank"),
    (MERGE_WRITTEN, "conveyor run"),
    (MERGE_REPLACED, "other rank"),
]
ALL = [(point, target) for point in (RESULTS_DONE, MERGE_WRITTEN, MERGE_REPLACED) for target in TARGETS]
CASES = ALL if int(os.environ.get("CONVEYOR_KILLS", "3")) > 3 else FEW


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("m") / "llama")


@pytest.fixture(scope="module")
def reference(model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """The uninterrupted run's results."""
    directory = tmp_path_factory.mktemp("reference")
    job = harness.job_file(directory, harness.inference_spec(directory, model, PROMPTS, LAYOUT))
    harness.reference_run(job, str(directory))
    return harness.sorted_results(directory)


def wait_for_stop(marker: Path, run, timeout: float = 300) -> int:
    """The pid of the rank that stopped at the point (it wrote the marker, then SIGSTOPped itself)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.is_file() and (text := marker.read_text()).endswith("\n"):
            pid = int(text)
            # stopped ("T" in /proc/PID/stat), not just about to stop
            while (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "T":
                time.sleep(0.01)
            return pid
        assert run.poll() is None, f"`conveyor run` exited {run.returncode} before a rank reached the point"
        time.sleep(0.05)
    raise AssertionError(f"no rank reached the stop point in {timeout} s")


def another_rank(name: str, stopped: int) -> int:
    """A rank other than ``stopped``, of its replica where one is still running."""
    others = [pid for pid in harness.ranks(name) if pid != stopped]
    replica = harness.rank_name(stopped).split(" rank")[0]
    return next((pid for pid in others if harness.rank_name(pid).startswith(replica + " ")), others[0])


@pytest.mark.parametrize("point, target", CASES, ids=[f"{p}-{t.replace(' ', '-')}" for p, t in CASES])
def test_a_kill_at_the_end_of_a_replicated_job_loses_and_repeats_nothing(
    model: Path, reference: list[bytes], tmp_path: Path, point: str, target: str
) -> None:
    marker, name = tmp_path / "stopped", str(tmp_path)
    job = harness.job_file(tmp_path, harness.inference_spec(tmp_path, model, PROMPTS, LAYOUT))
    stop_at = {"CONVEYOR_TEST_STOP_AT": f"{point}:{marker}"}
    run = harness.start(job, name, **stop_at)
    stopped = wait_for_stop(marker, run)
    if target == "conveyor run":
        harness.kill_conveyor_run(run, name)
        run = harness.start(job, name, **stop_at)  # (the marker is there: no rank stops again)
    else:
        victim = stopped if target == "stopped rank" else another_rank(name, stopped)
        print(f"{point}: killing {harness.rank_name(victim)} ({target})")
        os.kill(victim, signal.SIGKILL)
    harness.run_to_the_end(run, job, name)
    assert harness.sorted_results(tmp_path) == reference  # each id once, byte-identical
    harness.assert_finished_cleanly(tmp_path)
