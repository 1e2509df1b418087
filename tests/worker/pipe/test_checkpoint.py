"""Checkpoints: the commit protocol, and a run saved at 2 stages that continues exactly at 4 and 1."""

from __future__ import annotations

import json

import pytest
import torch
from conveyor import commit_protocol as ckpt

from tests.worker.pipe.scenarios import RESUME_AT, RESUME_STEPS, train_resumable


def _noop() -> None:
    pass


def _save(root, step, keep=2):
    tmp = ckpt.prepare(root, ckpt.step_name(step), True, _noop)
    (tmp / "data").write_text(str(step))
    return ckpt.commit(root, ckpt.step_name(step), keep, True, _noop)


def test_commit_publishes_latest_and_keeps_the_newest(tmp_path):
    assert ckpt.latest(tmp_path) is None
    for step in (1, 2, 3):
        committed = _save(tmp_path, step)
    assert committed.step == 3 and (tmp_path / "latest").read_text().strip() == "step-3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-2", "step-3"]


def test_uncommitted_directory_never_counts(tmp_path):
    _save(tmp_path, 1)
    tmp = ckpt.prepare(tmp_path, "step-2", True, _noop)  # a crash before commit leaves this behind
    (tmp / "data").write_text("partial")
    (tmp_path / "step-5").mkdir()  # even a renamed one, if `latest` was never rewritten
    assert ckpt.latest(tmp_path).name == "step-1"
    assert _save(tmp_path, 2).name == "step-2"  # the leftover is replaced, not merged


def test_a_staging_directory_left_by_a_kill_goes_once_a_later_step_commits(tmp_path):
    """A kill while step 3 was written leaves step-3.tmp; the run resumes at step 2 and (with another
    `every`) saves 4: step-3.tmp could never be published, and was left on the volume for good."""
    _save(tmp_path, 2)
    (ckpt.prepare(tmp_path, "step-3", True, _noop) / "data").write_text("partial")
    (tmp_path / "step-9.tmp").mkdir()  # a later step's, being written: kept
    _save(tmp_path, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-2", "step-4", "step-9.tmp"]


def test_termination_message(tmp_path):
    committed = _save(tmp_path, 4)
    body = ckpt.write_termination_message(tmp_path / "term", True, committed)
    assert json.loads((tmp_path / "term").read_text()) == body
    assert body["completed"] is True and body["lastCheckpoint"]["step"] == 4
    assert body["lastCheckpoint"]["time"].endswith("Z")


@pytest.mark.integration
@pytest.mark.timeout(450)
def test_saved_at_two_stages_continues_exactly_at_four_and_one(four_ranks):
    path, per_rank = four_ranks
    uninterrupted = per_rank[0]["uninterrupted"][0]
    assert sorted(uninterrupted) == list(range(RESUME_STEPS))
    resumed_4 = per_rank[0]["resumed_4_stages"][0]
    assert sorted(resumed_4) == list(range(RESUME_AT, RESUME_STEPS))  # no step repeated or dropped
    resumed_1, weights_1 = train_resumable(1, path, RESUME_AT)  # this process, no process group
    for step in range(RESUME_AT, RESUME_STEPS):
        assert resumed_4[step] == pytest.approx(uninterrupted[step], rel=1e-5), step
        assert resumed_1[step] == pytest.approx(uninterrupted[step], rel=1e-5), step
    # the final weights agree too, wherever they live
    final_2 = {k: v for r in per_rank for k, v in r["uninterrupted"][1].items()}
    final_4 = {k: v for r in per_rank for k, v in r["resumed_4_stages"][1].items()}
    assert set(final_2) == set(final_4) == set(weights_1)
    for name, value in final_2.items():
        torch.testing.assert_close(final_4[name], value, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(weights_1[name], value, rtol=1e-5, atol=1e-5, msg=name)
