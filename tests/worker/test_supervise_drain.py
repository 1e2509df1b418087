"""A signal-stopped group reports whether its children drained (all exited 0) or were cut short."""

import os
import signal
import sys
import threading

import pytest
from conveyor.supervise import Child, run_group

# Ready once the handler is installed; on SIGTERM, exit 0 (drains) or die by the signal (default action).
_CHILD = """
import signal, sys, time
if sys.argv[1] == "drain":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("up", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("behaviour, drained", [("drain", True), ("die", False)])
def test_signal_stop_reports_a_drain(behaviour, drained):
    env = dict(os.environ)
    children = [Child(f"c{i}", [sys.executable, "-c", _CHILD, behaviour], env) for i in range(2)]
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        outcome = run_group(children, grace_seconds=10)
    finally:
        timer.cancel()
    assert outcome.failed == "signal"
    assert outcome.code == 128 + signal.SIGTERM
    assert outcome.drained is drained
