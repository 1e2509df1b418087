"""One cause per failure: a rank that fails leaves one line saying why, and whoever supervises it
(``conveyor worker``, then ``conveyor run`` or the operator) reports that line once.

A refusal (bad input, results that are not this job's, no complete checkpoint to resume) is expected:
it exits 2 with its one-line message and no traceback. Anything else is a bug or a broken machine: its
traceback stays in that rank's log, and its last line becomes the cause.
"""

from __future__ import annotations

import os
from pathlib import Path

CAUSE_ENV = "CONVEYOR_CAUSE_FILE"  # per rank, set by `conveyor worker`
EXIT_REFUSED = 2


def is_refusal(err: BaseException) -> bool:
    from conveyor.commit_protocol import CheckpointError
    from conveyor.inference.validate import InputError
    from conveyor.pipe.config import ConfigError
    from conveyor.train.data import DatasetError

    return isinstance(err, (InputError, CheckpointError, DatasetError, ConfigError))


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if is_refusal(err) else f"{type(err).__name__}: {text}"


def write_cause(text: str) -> None:
    """Leave this rank's cause where its supervisor reads it (nothing without a supervisor)."""
    path = os.environ.get(CAUSE_ENV)
    if path:
        Path(path).write_text(text[-3000:])


def read_cause(path: str | Path) -> str | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return text or None
