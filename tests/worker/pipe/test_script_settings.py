"""A training script's settings from the environment the operator renders (CONVEYOR_SPEC carries only
values that differ from their defaults; the rest must come from the spec's models, not be guessed)."""

from __future__ import annotations

import pytest
from conveyor.env import pod_environ
from conveyor.pipe.script import SettingsError, TrainSettings
from conveyor.spec import CheckpointSpec, parse_spec


def _settings(checkpoint: dict[str, object]) -> TrainSettings:
    spec = parse_spec({"mode": "train", "train": {"script": "/t.py"}, "checkpoint": checkpoint})
    env = pod_environ(job="j", spec=spec, replica=0, stage=0, master_addr="127.0.0.1", master_port=29500)
    return TrainSettings.from_environ(env)


def test_checkpoint_defaults_come_from_the_model() -> None:
    defaults = CheckpointSpec()
    settings = _settings({})
    assert settings.checkpoint_dir is not None and str(settings.checkpoint_dir) == defaults.path
    assert (settings.checkpoint_every, settings.checkpoint_keep) == (defaults.every, defaults.keep)


def test_checkpoint_values_set_by_the_user_are_read() -> None:
    settings = _settings({"path": "/ckpt", "every": 7, "keep": 2})
    assert (str(settings.checkpoint_dir), settings.checkpoint_every, settings.checkpoint_keep) == (
        "/ckpt",
        7,
        2,
    )


def test_a_bad_checkpoint_in_the_spec_names_the_field() -> None:
    with pytest.raises(SettingsError, match=r"spec\.checkpoint\.every"):
        TrainSettings.from_environ({"CONVEYOR_SPEC": '{"checkpoint": {"every": 0}}'})
