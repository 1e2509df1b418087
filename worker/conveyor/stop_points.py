"""Test-only stop points: named moments of the batch job's commit protocol where a kill test stops a
rank, to kill it, or its `conveyor run`, exactly there. A kill at a random moment almost never lands
inside a merge of the replicas' parts, which takes milliseconds (tests/worker/test_kill_points.py).

``CONVEYOR_TEST_STOP_AT=<point>:<marker file>`` (read by the rank's entry point, rank.py): the first
process to reach ``point`` creates the marker file, exclusively, so a marker stops one process once
whatever restarts follow; writes its pid there and stops itself (SIGSTOP) until the test kills it.
Unset, ``reach`` is one comparison.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

# The writer's last commit (``done``) is durable; with replicas, the merge is next.
RESULTS_DONE = "results-done"
# The merge's temporary file holds every part's committed lines, fsynced; the output is not written yet.
MERGE_WRITTEN = "merge-written"
# The output is the merged parts (replaced and its directory fsynced); the rank has not returned yet.
MERGE_REPLACED = "merge-replaced"
POINTS = (RESULTS_DONE, MERGE_WRITTEN, MERGE_REPLACED)


class StopPoints:
    def __init__(self) -> None:
        self.point: str | None = None
        self.marker: Path | None = None

    def configure(self, value: str | None) -> None:
        """``value``: CONVEYOR_TEST_STOP_AT (``<point>:<marker file>``), or None for no stop."""
        if not value:
            self.point = self.marker = None
            return
        point, sep, marker = value.partition(":")
        if point not in POINTS or not sep or not marker:
            raise ValueError(
                f"CONVEYOR_TEST_STOP_AT={value!r}: use <point>:<marker file>, point one of {POINTS}"
            )
        self.point, self.marker = point, Path(marker)

    def reach(self, point: str) -> None:
        if point != self.point or self.marker is None:
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # stopped a process here once already
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGSTOP)


STOP_POINTS = StopPoints()
