"""The batch job commits its results on a thread of its own (job.Commits, progress.ResultLog): each commit
covers whole lines, and exactly the lines it counts, while the scheduler's thread appends; commits
asked for during one coalesce; no fsync waits on the scheduler's thread before the last commit; a
commit that fails fails the job."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from conveyor.inference import progress
from conveyor.inference.job import Commits, ResultSink
from conveyor.inference.pipeline.generate import Result
from conveyor.inference.progress import ResultLog


def result(i: int) -> dict:
    return {"id": i, "output_ids": list(range(i % 7)), "text": "x" * (i % 13), "finish_reason": "length"}


def test_a_commit_records_whole_lines_and_their_count_while_another_thread_appends(tmp_path: Path) -> None:
    log = ResultLog(tmp_path / "out.jsonl", {"digest": "d"})
    log.open()
    seen: list[tuple[int, int]] = []
    done = threading.Event()

    def commit_again_and_again() -> None:
        while not done.is_set():
            log.commit()
            seen.append((int(log.record["committedBytes"]), log.completed))

    committer = threading.Thread(target=commit_again_and_again)
    committer.start()
    appended, deadline = 0, time.monotonic() + 60
    # Appends go on until several commits have overlapped them: a slow disk (a loaded CI
    # machine) may take longer for one commit's fsyncs than for 3,000 appends.
    while appended < 3000 or (len(seen) < 3 and time.monotonic() < deadline):
        log.append(result(appended))
        appended += 1
    done.set()
    committer.join()
    log.commit(done=True)
    assert len(seen) >= 3
    data = (tmp_path / "out.jsonl").read_bytes()
    for size, completed in [*seen, (int(log.record["committedBytes"]), log.completed)]:
        head = data[:size]
        assert head == b"" or head.endswith(b"\n")  # whole lines
        assert len(head.splitlines()) == completed  # and the count is theirs
    assert log.completed == appended and int(log.record["committedBytes"]) == len(data)
    assert log.uncommitted == 0
    assert [json.loads(line)["id"] for line in data.splitlines()] == list(range(appended))


def test_commits_asked_for_during_one_coalesce_and_none_run_on_the_callers_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = ResultLog(tmp_path / "out.jsonl", {"digest": "d"})
    log.open()
    sink = ResultSink("j", log, is_writer=True, stage=0, every=1)  # a commit asked after every result
    fsyncs: list[str] = []
    first_commit_started, release = threading.Event(), threading.Event()
    fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        fsyncs.append(threading.current_thread().name)
        if len(fsyncs) == 1:  # the first commit's fsync waits until every result is appended
            first_commit_started.set()
            assert release.wait(30)
        fsync(fd)

    monkeypatch.setattr(progress.os, "fsync", slow_fsync)
    sink.start(total=50, done_before=0)
    sink.on_result(Result(0, [1], [2], "length"))
    assert first_commit_started.wait(30)
    for i in range(1, 50):  # while the first commit is under way
        sink.on_result(Result(i, [1], [2], "length"))
    release.set()
    deadline = time.monotonic() + 30
    while log.completed < 50 and time.monotonic() < deadline:  # the 49 asked for, in one more commit
        time.sleep(0.01)
    assert log.completed == 50 and not log.done
    sink.finish()
    names = [n for n in fsyncs if n != threading.current_thread().name]
    assert set(names) == {"result-commits"}
    # the first commit, one for the 49 asked during it, and finish's own (3 fsyncs each: the output,
    # the record's temporary file, its directory)
    assert len(fsyncs) == 3 * 3, fsyncs
    assert fsyncs[-3:] == [threading.current_thread().name] * 3  # finish commits on the caller's thread
    assert log.completed == 50 and log.done


def test_a_failed_commit_is_raised_on_the_schedulers_thread(tmp_path: Path) -> None:
    calls = []

    def failing() -> None:
        calls.append(1)
        raise OSError(28, "No space left on device")

    commits = Commits(failing)
    commits.request()
    commits._thread.join(30)  # the thread ends on the error
    with pytest.raises(OSError, match="No space left"):
        commits.request()
    with pytest.raises(OSError, match="No space left"):
        commits.close()
    assert calls == [1]
