"""Checkpoints are verified before a resume (conveyor.commit_protocol.resume_point): a missing or truncated
latest falls back to the newest complete one with a warning that names what was skipped; none complete
is refused in one line; a damaged checkpoint never loads silently or as a traceback."""

from __future__ import annotations

import logging
from pathlib import Path

import conveyor
import pytest
from conveyor import commit_protocol as ckpt
from conveyor.commit_protocol import CheckpointError
from conveyor.pipe import PipelineModule

from tests.worker.pipe.models import MODELS, lm_loss, make_data
from tests.worker.pipe.scenarios import GLOBAL_MICRO_BATCHES, _feed, resume_config


def _noop() -> None:
    pass


def _save(root: Path, step: int, data: str = "x" * 100) -> None:
    tmp = ckpt.prepare(root, ckpt.step_name(step), True, _noop)
    (tmp / "shard").write_text(data)
    ckpt.commit(root, ckpt.step_name(step), 5, True, _noop)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_commit_writes_a_manifest_and_a_complete_checkpoint_verifies(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    assert (tmp_path / "step-1" / ckpt.MANIFEST).is_file()
    assert ckpt.verify(tmp_path / "step-1") is None
    assert ckpt.resume_point(tmp_path).name == "step-1"


def test_latest_naming_a_missing_directory_falls_back_with_a_warning(tmp_path: Path) -> None:
    for step in (250, 300):
        _save(tmp_path, step)
    (tmp_path / "step-300" / "shard").unlink()
    import shutil

    shutil.rmtree(tmp_path / "step-300")
    warnings: list[str] = []
    point = ckpt.resume_point(tmp_path, warnings.append)
    assert point is not None and point.name == "step-250" and point.step == 250
    assert warnings == [f"resuming from step-250 in {tmp_path}; skipped step-300 (named by latest, missing)"]


def test_a_truncated_shard_is_skipped(tmp_path: Path) -> None:
    for step in (1, 2):
        _save(tmp_path, step)
    _truncate(tmp_path / "step-2" / "shard")
    warnings: list[str] = []
    assert ckpt.resume_point(tmp_path, warnings.append).name == "step-1"
    assert "step-2 (named by latest, shard is 50 bytes, 100 at commit)" in warnings[0]


def test_the_run_resumed_past_a_damaged_latest_commits_its_step_again(tmp_path: Path) -> None:
    # step-2 is torn; the run resumes from step-1, reaches step 2 again and must be able to commit it
    for step in (1, 2):
        _save(tmp_path, step)
    _truncate(tmp_path / "step-2" / "shard")
    assert ckpt.resume_point(tmp_path).name == "step-1"
    _save(tmp_path, 2, data="y" * 100)
    assert ckpt.resume_point(tmp_path).name == "step-2"
    assert (tmp_path / "step-2" / "shard").read_text() == "y" * 100
    with pytest.raises(CheckpointError, match="already the committed checkpoint"):
        _save(tmp_path, 2)  # a complete committed checkpoint is never overwritten


def test_no_complete_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    _truncate(tmp_path / "step-1" / "shard")
    with pytest.raises(
        CheckpointError, match=r"no complete checkpoint in .*: step-1 \(named by latest, shard is"
    ):
        ckpt.resume_point(tmp_path)
    assert ckpt.resume_point(tmp_path / "nothing-here") is None  # nothing to resume: a fresh start


def _engine(stages: int = 1):
    net = PipelineModule(MODELS["tied"](), num_stages=stages, loss_fn=lm_loss)
    engine, _, _, _ = conveyor.initialize(model=net, config=resume_config(1))
    return engine


def _train_and_save(root: Path, steps: int) -> None:
    engine = _engine()
    for step in make_data(steps, GLOBAL_MICRO_BATCHES):
        engine.train_batch(_feed(engine, step, GLOBAL_MICRO_BATCHES))
        engine.save_checkpoint(root, client_state={"step": engine.global_steps})


def test_engine_resumes_from_the_newest_complete_checkpoint(tmp_path: Path, caplog) -> None:
    _train_and_save(tmp_path, 3)
    shard = max((tmp_path / "step-3").glob("*.distcp"), key=lambda p: p.stat().st_size)
    _truncate(shard)
    engine = _engine()
    with caplog.at_level(logging.WARNING):
        path, client = engine.load_checkpoint(tmp_path)
    assert path == tmp_path / "step-2" and engine.global_steps == 2 and client == {"step": 2}
    assert f"skipped step-3 (named by latest, {shard.name} is" in caplog.text

    for step in ("step-1", "step-2"):
        _truncate(max((tmp_path / step).glob("*.distcp"), key=lambda p: p.stat().st_size))
    with pytest.raises(CheckpointError, match="no complete checkpoint in") as err:
        _engine().load_checkpoint(tmp_path)
    assert "\n" not in str(err.value)


def test_a_shard_damaged_at_the_same_size_fails_in_one_line_naming_the_checkpoint(tmp_path: Path) -> None:
    _train_and_save(tmp_path, 1)
    shard = max((tmp_path / "step-1").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(b"\0" * shard.stat().st_size)
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'step-1'} does not load") as err:
        _engine().load_checkpoint(tmp_path)
    assert "\n" not in str(err.value)


def test_a_size_mismatch_is_named_in_the_one_line(tmp_path: Path) -> None:
    # DCP's report is a traceback; its first line with "Error" was the source line `raise ValueError(`,
    # so a checkpoint of another model's shapes failed with "does not load: raise ValueError("
    import torch
    import torch.distributed.checkpoint as dcp
    from conveyor.pipe.checkpoint import _first_line, _quiet
    from torch.distributed.checkpoint import DefaultLoadPlanner

    with _quiet():
        dcp.save({"model": {"w": torch.zeros(3, 4)}}, checkpoint_id=tmp_path)
        with pytest.raises(BaseException) as err:
            dcp.load(
                {"model": {"w": torch.zeros(3, 5)}}, checkpoint_id=tmp_path, planner=DefaultLoadPlanner()
            )
    assert _first_line(err.value) == (
        "ValueError: Size mismatch between saved torch.Size([3, 4]) and current: torch.Size([3, 5]) for model.w"
    )
