"""Pre-flight checks overlapped with the ranks' start, without letting bad input reach a rank.

A rank spends its first seconds importing torch and transformers; the pre-flight checks (the model's
files, the layout, every input line) spend theirs importing the same. Run one after the other they
added up: 8.7 s of pre-flight then 8.8 s of imports before a 7B job's first decode on an H200. So the
supervisor starts the ranks at once and checks meanwhile; a rank waits at the gate, after its imports
and rendezvous and before it reads the model's config or the input, until the checks have passed. If
they fail, the supervisor stops the ranks, which have read nothing, and reports the checks' error."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

GATE_ENV = "CONVEYOR_PREFLIGHT_GATE"  # a file that exists once the checks have passed


def open_gate(path: str | Path) -> None:
    Path(path).touch()


def wait_at_gate(environ: Mapping[str, str] = os.environ, poll_seconds: float = 0.02) -> float:
    """Block until the supervisor's checks have passed (no gate named: at once); returns the seconds
    waited. A failed check never opens it: the supervisor stops this process instead."""
    gate, started = environ.get(GATE_ENV), time.monotonic()
    while gate and not os.path.exists(gate):
        time.sleep(poll_seconds)
    return time.monotonic() - started
