"""The progress watchdog behind the container's liveness probe: a rank that stops making progress (a
deadlocked collective, stuck storage, a wedged GPU) answers 503 on ``/live`` once ``hang_timeout``
seconds pass without a beat, the kubelet restarts its container, and the operator restarts the group.

Before the first beat the rank is loading and compiling: that is start-up (the startup probe's budget),
never a hang. A test hook (``stall_after``) ignores beats past the n-th, so a test can make a rank hang
without deadlocking anything.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Progress:
    def __init__(
        self,
        hang_timeout: float | None = None,
        stall_after: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.hang_timeout = hang_timeout
        self.stall_after = stall_after
        self.beats = 0
        self._last: float | None = None

    def configure(self, hang_timeout: float | None, stall_after: int | None = None) -> None:
        with self._lock:
            self.hang_timeout, self.stall_after = hang_timeout, stall_after

    def beat(self) -> None:
        """One unit of progress (a step, a token, a committed batch)."""
        with self._lock:
            self.beats += 1
            if self.stall_after is not None and self.beats > self.stall_after:
                return  # the test hook: progress stops here
            self._last = self._clock()

    def silent_for(self) -> float | None:
        """Seconds since the last beat; None before the first (still starting)."""
        with self._lock:
            return None if self._last is None else self._clock() - self._last

    def hung_cause(self) -> str:
        return f"Hung: no progress for {self.silent_for() or 0:.0f}s (hangTimeoutSeconds {self.hang_timeout:.0f})"

    def is_live(self) -> bool:
        silent = self.silent_for()
        return self.hang_timeout is None or silent is None or silent <= self.hang_timeout


PROGRESS = Progress()
