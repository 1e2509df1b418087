"""What a training script needs from its environment, read once at its entry point.

``conveyor worker`` runs ``spec.train.script`` on every rank with RANK/WORLD_SIZE/... and
CONVEYOR_TRAIN_STEPS, CONVEYOR_TRAIN_CONFIG (JSON), CONVEYOR_CHECKPOINT_DIR, CONVEYOR_RESTART,
CONVEYOR_TERMINATION_LOG and CONVEYOR_SPEC set. ``TrainSettings.from_environ()`` gathers them so a script
stays DeepSpeed-shaped; ``finish()`` writes the termination message the operator reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from conveyor.commit_protocol import latest, write_termination_message
from conveyor.spec import CheckpointSpec
from conveyor.spec_errors import format_validation_error


class SettingsError(ValueError):
    pass


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    config: dict[str, Any]
    stages: int
    job: str = "local"
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 100
    checkpoint_keep: int = 3
    restart: int = 0
    local_rank: int = 0
    termination_log: Path | None = None
    spec: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str] | None = None,
        default_steps: int = 100,
        default_config: dict[str, Any] | None = None,
        default_stages: int = 1,
    ) -> TrainSettings:
        env = os.environ if environ is None else environ
        spec: dict[str, Any] = {}
        if env.get("CONVEYOR_SPEC"):
            try:
                spec = json.loads(env["CONVEYOR_SPEC"])
            except json.JSONDecodeError as err:
                raise SettingsError(f"CONVEYOR_SPEC is not valid JSON: {err}") from None
        config = default_config or {}
        if env.get("CONVEYOR_TRAIN_CONFIG"):
            try:
                config = json.loads(env["CONVEYOR_TRAIN_CONFIG"]) or config
            except json.JSONDecodeError as err:
                raise SettingsError(f"CONVEYOR_TRAIN_CONFIG is not valid JSON: {err}") from None
        # CONVEYOR_SPEC leaves out values equal to their defaults (`checkpoint: {}` is all defaults): the
        # model fills them in.
        has_checkpoint = spec.get("checkpoint") is not None
        try:
            checkpoint = CheckpointSpec.model_validate(spec.get("checkpoint") or {})
        except ValidationError as err:
            problems = format_validation_error(err, "spec.checkpoint")
            raise SettingsError(f"CONVEYOR_SPEC does not validate:\n{problems}") from None
        directory = env.get("CONVEYOR_CHECKPOINT_DIR") or (checkpoint.path if has_checkpoint else None)
        return cls(
            steps=_int(env, "CONVEYOR_TRAIN_STEPS", default_steps),
            config=config,
            stages=_int(
                env, "CONVEYOR_STAGES", (spec.get("parallelism") or {}).get("stages", default_stages)
            ),
            job=env.get("CONVEYOR_JOB", "local"),
            checkpoint_dir=Path(directory) if directory else None,
            checkpoint_every=checkpoint.every,
            checkpoint_keep=checkpoint.keep,
            restart=_int(env, "CONVEYOR_RESTART", 0),
            local_rank=_int(env, "LOCAL_RANK", 0),
            termination_log=Path(env["CONVEYOR_TERMINATION_LOG"])
            if env.get("CONVEYOR_TERMINATION_LOG")
            else None,
            spec=spec,
        )

    def finish(self, completed: bool = True, message: str | None = None) -> dict[str, Any]:
        """Write ``{"completed": ..., "lastCheckpoint": {...}}`` (once per pod: local rank 0)."""
        from conveyor.skipped_checkpoints import with_skipped

        committed = latest(self.checkpoint_dir) if self.checkpoint_dir else None
        path = self.termination_log if self.local_rank == 0 else None
        report = with_skipped(committed.as_status() if committed else None, self.checkpoint_dir)
        return write_termination_message(path, completed, report, message)
