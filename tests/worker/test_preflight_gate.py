"""The pre-flight checks overlap the ranks' start (preflight_gate.py): a rank that waits at the gate
goes on only once they pass; if they fail, it is stopped having read nothing, and the checks' error is
what the caller sees."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
from conveyor.preflight_gate import GATE_ENV, wait_at_gate
from conveyor.supervise import Child, Gate, run_group

# a rank's shape: imports (here: nothing), the gate, then it "reads the input" (writes a marker)
RANK = """
import os, sys
from conveyor.preflight_gate import wait_at_gate
wait_at_gate()
open(sys.argv[1], "w").write("read the input")
"""


def _rank(tmp: Path, gate: Path) -> Child:
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), GATE_ENV: str(gate)}
    return Child(name="rank 0", argv=[sys.executable, "-c", RANK, str(tmp / "marker")], env=env)


def test_the_rank_goes_on_once_the_checks_pass(tmp_path: Path) -> None:
    checked = threading.Event()

    def check() -> None:
        time.sleep(1.0)  # the rank is up and waiting by now
        assert not (tmp_path / "marker").exists()
        checked.set()

    gate = Gate(check, tmp_path / "passed")
    outcome = run_group([_rank(tmp_path, gate.path)], grace_seconds=5, gate=gate)
    assert outcome.code == 0 and checked.is_set()
    assert (tmp_path / "marker").read_text() == "read the input"


def test_a_failed_check_stops_the_rank_before_it_reads_anything(tmp_path: Path) -> None:
    def check() -> None:
        time.sleep(0.5)
        raise ValueError("spec.inference.input: line 3: no prompt")

    gate = Gate(check, tmp_path / "passed")
    started = time.monotonic()
    with pytest.raises(ValueError, match="line 3"):
        run_group([_rank(tmp_path, gate.path)], grace_seconds=5, gate=gate)
    assert not (tmp_path / "marker").exists() and not gate.path.exists()
    assert time.monotonic() - started < 5  # stopped by SIGTERM, not by the grace period's SIGKILL


def test_no_gate_named_waits_for_nothing() -> None:
    assert wait_at_gate({}) < 0.01
