"""The progress watchdog behind the container's liveness probe: a rank that stops making progress (a
deadlocked collective, stuck storage, a wedged GPU) answers 503 on ``/live`` once ``hang_timeout``
seconds pass without a beat, the kubelet restarts its container, and the operator restarts the group.

Before the first beat the rank is loading and compiling: that is start-up (the startup probe's budget),
never a hang. Test hooks: ``stall_after`` ignores beats past the n-th, so a test can make a rank look
hung without deadlocking anything; ``wedge_after`` blocks the beating thread for good at the beat past
the n-th, as a stuck collective would (the rank makes no progress at all, so only the probe can end it).
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
        self.wedge_after: int | None = None
        self.beats = 0
        self._last: float | None = None

    def configure(
        self, hang_timeout: float | None, stall_after: int | None = None, wedge_after: int | None = None
    ) -> None:
        with self._lock:
            self.hang_timeout, self.stall_after, self.wedge_after = hang_timeout, stall_after, wedge_after

    def beat(self) -> None:
        """One unit of progress (a step, a token, a committed batch)."""
        with self._lock:
            self.beats += 1
            wedged = self.wedge_after is not None and self.beats > self.wedge_after
            stalled = wedged or (self.stall_after is not None and self.beats > self.stall_after)
            if not stalled:  # the test hooks: progress stops here
                self._last = self._clock()
        if wedged:
            threading.Event().wait()  # for good: only the liveness probe's kill ends this process

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
