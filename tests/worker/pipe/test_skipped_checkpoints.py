"""A checkpoint a resume skips is recorded on the checkpoint volume (conveyor.skipped_checkpoints), once
per damaged directory, and reported in rank 0's metrics and in every termination message, so that the
operator can show and count it."""

from __future__ import annotations

import json
from pathlib import Path

from conveyor import commit_protocol as ckpt
from conveyor import skipped_checkpoints
from conveyor.commit_protocol import Skipped
from prometheus_client import generate_latest

from tests.worker.pipe.test_checkpoint_verify import _engine, _train_and_save, _truncate


def test_a_skip_is_recorded_once_per_damaged_directory(tmp_path: Path) -> None:
    assert skipped_checkpoints.read(tmp_path) == [] and skipped_checkpoints.summary([]) == {}
    cut = Skipped("step-30", 30, "shard is 5 bytes, 10 at commit", named_by_latest=True)
    entries = skipped_checkpoints.record(tmp_path, [cut], "step-20")
    assert [(e["name"], e["step"], e["reason"], e["resumedFrom"]) for e in entries] == [
        ("step-30", 30, "shard is 5 bytes, 10 at commit", "step-20")
    ]
    # a second restart before step 30 is committed again skips the same directory: not a new skip
    assert len(skipped_checkpoints.record(tmp_path, [cut], "step-20")) == 1
    # skips are passed newest first (resume order) and recorded oldest first
    older = Skipped("step-50", 50, "missing")
    newer = Skipped("step-60", 60, "no MANIFEST.json (never committed)")
    entries = skipped_checkpoints.record(tmp_path, [newer, older], "step-40")
    assert [e["name"] for e in entries] == ["step-30", "step-50", "step-60"]
    assert skipped_checkpoints.read(tmp_path) == entries  # it is on the volume, for the next process
    summary = skipped_checkpoints.summary(entries)
    assert summary["skipped"] == 3 and summary["lastSkipped"]["name"] == "step-60"
    assert summary["lastSkipped"]["reason"] == "no MANIFEST.json (never committed)"


def test_a_damaged_line_does_not_hide_the_others(tmp_path: Path) -> None:
    skipped_checkpoints.record(tmp_path, [Skipped("step-3", 3, "missing")], "step-2")
    with open(tmp_path / skipped_checkpoints.RECORD, "a") as f:
        f.write('{"torn\n')
    assert [e["name"] for e in skipped_checkpoints.read(tmp_path)] == ["step-3"]


def test_termination_reports_carry_the_count_and_the_last_skip(tmp_path: Path) -> None:
    report = {"step": 20, "time": "2026-12-04T06:00:00Z"}
    assert skipped_checkpoints.with_skipped(report, tmp_path) == report  # nothing skipped: unchanged
    assert skipped_checkpoints.with_skipped(None, tmp_path) is None
    skipped_checkpoints.record(tmp_path, [Skipped("step-30", 30, "missing")], "step-20")
    out = skipped_checkpoints.with_skipped(report, tmp_path)
    assert out is not None and out["step"] == 20 and out["skipped"] == 1
    assert out["lastSkipped"]["name"] == "step-30" and out["lastSkipped"]["reason"] == "missing"
    body = ckpt.write_termination_message(tmp_path / "term", False, out)
    assert json.loads((tmp_path / "term").read_text()) == body  # it fits a termination message


def test_the_engine_records_and_publishes_what_its_resume_skipped(tmp_path: Path) -> None:
    _train_and_save(tmp_path, 3)
    shard = max((tmp_path / "step-3").glob("*.distcp"), key=lambda p: p.stat().st_size)
    _truncate(shard)
    engine = _engine()
    path, _ = engine.load_checkpoint(tmp_path)
    assert path == tmp_path / "step-2"
    [entry] = skipped_checkpoints.read(tmp_path)
    assert entry["name"] == "step-3" and entry["resumedFrom"] == "step-2"
    assert shard.name in entry["reason"]
    text = generate_latest().decode()
    assert f'conveyor_checkpoints_skipped{{job="{engine.job}"}} 1.0' in text
    assert 'conveyor_checkpoint_last_skipped_step{checkpoint="step-3"' in text
    from conveyor_operator.scrape import parse_checkpoint

    # what the operator reads from it (the scrape of rank 0 while it runs)
    seen = parse_checkpoint(text)
    assert seen is not None and seen.skipped == 1 and seen.last_skipped is not None
    assert seen.last_skipped.name == "step-3" and seen.last_skipped.step == 3
