"""The progress watchdog behind the liveness probe: start-up is never a hang, a rank silent past the hang
timeout answers 503 on /live, and the test hook stops a rank's progress."""

from __future__ import annotations

from conveyor import metrics
from conveyor.utils import free_port
from conveyor.watchdog import Progress
from prometheus_client import CollectorRegistry

from tests.worker.test_readiness import get


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_start_up_is_never_a_hang() -> None:
    clock = Clock()
    progress = Progress(hang_timeout=30, clock=clock)
    clock.now += 10_000  # loading and compiling for hours: still live
    assert progress.silent_for() is None and progress.is_live()


def test_silence_past_the_timeout_is_a_hang_and_a_beat_clears_it() -> None:
    clock = Clock()
    progress = Progress(hang_timeout=30, clock=clock)
    progress.beat()
    clock.now += 30
    assert progress.is_live()  # exactly the timeout: not yet
    clock.now += 1
    assert not progress.is_live() and progress.silent_for() == 31
    progress.beat()
    assert progress.is_live()


def test_without_a_timeout_nothing_is_a_hang() -> None:
    clock = Clock()
    progress = Progress(clock=clock)
    progress.beat()
    clock.now += 1e9
    assert progress.is_live()


def test_the_test_hook_stops_progress_after_n_beats() -> None:
    clock = Clock()
    progress = Progress(hang_timeout=5, stall_after=2, clock=clock)
    for _ in range(2):
        clock.now += 1
        progress.beat()
    for _ in range(10):  # the rank goes on "working", but its beats no longer count
        clock.now += 1
        progress.beat()
    assert progress.beats == 12 and progress.silent_for() == 10 and not progress.is_live()


def test_live_endpoint_answers_503_once_hung() -> None:
    clock = Clock()
    progress = Progress(hang_timeout=30, clock=clock)
    port = free_port()
    assert metrics.serve(port, registry=CollectorRegistry(), readiness=metrics.Readiness(), progress=progress)
    assert get(port, "/live") == (200, "live\n")  # starting
    progress.beat()
    clock.now += 45
    assert get(port, "/live") == (503, "hung: no progress for 45s\n")
    progress.beat()
    assert get(port, "/live") == (200, "live\n")


def test_a_hung_live_probe_leaves_the_hung_cause(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from conveyor.failure import CAUSE_ENV, read_cause

    monkeypatch.setenv(CAUSE_ENV, str(tmp_path / "cause"))
    clock = Clock()
    progress = Progress(hang_timeout=30, clock=clock)
    port = free_port()
    assert metrics.serve(port, registry=CollectorRegistry(), readiness=metrics.Readiness(), progress=progress)
    progress.beat()
    clock.now += 40
    assert get(port, "/live")[0] == 503
    assert read_cause(tmp_path / "cause") == "Hung: no progress for 40s (hangTimeoutSeconds 30)"


def test_a_child_programs_beats_reach_its_rank_through_the_beat_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A spec.train.command program beats in its own process; its rank watches the file it writes."""
    import os
    import subprocess
    import sys

    from conveyor.watchdog import PROGRESS_FILE_ENV

    from tests.conftest import subprocess_env

    beat_file = tmp_path / "beats"
    rank = Progress(hang_timeout=30)
    rank.watch(beat_file)
    assert rank.silent_for() is None and rank.is_live()  # the program is starting
    program = "from conveyor.watchdog import PROGRESS; PROGRESS.beat(); PROGRESS.beat()"
    subprocess.run(
        [sys.executable, "-c", program], env=subprocess_env(**{PROGRESS_FILE_ENV: str(beat_file)}), check=True
    )
    assert 0 <= rank.silent_for() < 10 and rank.is_live()  # type: ignore[operator]
    an_hour_ago = beat_file.stat().st_mtime - 3600
    os.utime(beat_file, (an_hour_ago, an_hour_ago))  # then it stopped making progress
    assert rank.silent_for() > 3590 and not rank.is_live()  # type: ignore[operator]


def test_beats_reach_the_file_at_most_once_a_second(tmp_path) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    beat_file = tmp_path / "beats"
    progress = Progress(clock=clock, beat_file=beat_file)
    progress.beat()
    beat_file.unlink()
    clock.now += 0.5
    progress.beat()  # within the second: a step of milliseconds does not write the file each time
    assert not beat_file.exists()
    clock.now += 0.5
    progress.beat()
    assert beat_file.exists()
