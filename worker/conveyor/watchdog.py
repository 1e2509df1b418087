"""The progress watchdog behind the container's liveness probe: a rank that stops making progress (a
deadlocked collective, stuck storage, a wedged GPU) answers 503 on ``/live`` once ``hang_timeout``
seconds pass without a beat, the kubelet restarts its container, and the operator restarts the group.

Before the first beat the rank is loading and compiling: that is start-up (the startup probe's budget),
never a hang. Test hooks: ``stall_after`` ignores beats past the n-th, so a test can make a rank look
hung without deadlocking anything; ``wedge_after`` blocks the beating thread for good at the beat past
the n-th, as a stuck collective would (the rank makes no progress at all, so only the probe can end it).

A ``spec.train.command`` program is a child of its rank, with a ``PROGRESS`` of its own: it beats into
the file named by ``CONVEYOR_PROGRESS_FILE`` (its mtime, at most once a second), which the rank watches
(``watch``), so the rank's probe sees the program's progress.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

PROGRESS_FILE_ENV = "CONVEYOR_PROGRESS_FILE"
_FILE_BEAT_SECONDS = 1.0  # a step can take milliseconds; hang timeouts are tens of seconds


class Progress:
    def __init__(
        self,
        hang_timeout: float | None = None,
        stall_after: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        beat_file: str | Path | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.hang_timeout = hang_timeout
        self.stall_after = stall_after
        self.wedge_after: int | None = None
        self.beats = 0
        self._last: float | None = None
        self._beat_file = Path(beat_file) if beat_file else None  # where this process's beats also go
        self._written = float("-inf")
        self._watched: Path | None = None  # a child program's beat file (its rank watches it)

    def configure(
        self, hang_timeout: float | None, stall_after: int | None = None, wedge_after: int | None = None
    ) -> None:
        with self._lock:
            self.hang_timeout, self.stall_after, self.wedge_after = hang_timeout, stall_after, wedge_after

    def beat(self) -> None:
        """One unit of progress (a step, a token, a committed batch)."""
        write = False
        with self._lock:
            self.beats += 1
            wedged = self.wedge_after is not None and self.beats > self.wedge_after
            stalled = wedged or (self.stall_after is not None and self.beats > self.stall_after)
            if not stalled:  # the test hooks: progress stops here
                self._last = self._clock()
                write = self._beat_file is not None and self._last - self._written >= _FILE_BEAT_SECONDS
                if write:
                    self._written = self._last
        if write:
            with contextlib.suppress(OSError):  # training goes on; its rank's probe sees the silence
                self._beat_file.touch()  # type: ignore[union-attr]
        if wedged:
            threading.Event().wait()  # for good: only the liveness probe's kill ends this process

    def watch(self, beat_file: str | Path) -> None:
        """Count the beats a child program writes to ``beat_file`` as this process's own."""
        with self._lock:
            self._watched = Path(beat_file)

    def silent_for(self) -> float | None:
        """Seconds since the last beat, this process's or a watched child's; None before the first
        (still starting)."""
        with self._lock:
            silent = None if self._last is None else self._clock() - self._last
            watched = self._watched
        if watched is not None:
            try:  # the file's time is the wall clock's
                theirs = max(0.0, time.time() - watched.stat().st_mtime)
            except OSError:  # not written yet: the program is starting
                return silent
            silent = theirs if silent is None else min(silent, theirs)
        return silent

    def hung_cause(self) -> str:
        return f"Hung: no progress for {self.silent_for() or 0:.0f}s (hangTimeoutSeconds {self.hang_timeout:.0f})"

    def is_live(self) -> bool:
        silent = self.silent_for()
        return self.hang_timeout is None or silent is None or silent <= self.hang_timeout


PROGRESS = Progress(beat_file=os.environ.get(PROGRESS_FILE_ENV))
