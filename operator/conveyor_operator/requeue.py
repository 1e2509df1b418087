"""Reconciles a plan asked for at a time: when a group's restart backoff ends, when a pod stuck
terminating passes its deadline, when a TTL or an unschedulable timeout expires (``Plan.requeue_after``).

Every trigger of a reconcile is otherwise an event (the job or one of its pods changed) or the resync
timer (every ``RESYNC_SECONDS``). A backoff of 1 s after a failure that changes nothing more would then
end only at the next resync, up to 10 s late: the chaos loop (tests/e2e/chaos.py) showed restarts made
10 s after their failure with ``backoffSeconds: 1``. A requeue is a one-shot timer per job; an earlier
request replaces a later one, and one at or beyond the resync interval is left to the resync.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

MARGIN_SECONDS = 0.05  # a little after the due time, so that the reconcile finds the backoff over


class Requeues:
    def __init__(self, reconcile: Callable[[str, str], object], horizon: float) -> None:
        self._reconcile = reconcile
        self._horizon = horizon  # requests this far away or more are left to the resync timer
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], tuple[float, threading.Timer]] = {}

    def request(self, namespace: str, name: str, delay: float | None) -> bool:
        """Reconcile the job ``delay`` seconds from now, unless one is due sooner; True if scheduled."""
        if delay is None or delay >= self._horizon:
            return False
        key = (namespace, name)
        due = time.monotonic() + max(delay, 0.0) + MARGIN_SECONDS
        with self._lock:
            pending = self._pending.get(key)
            if pending is not None and pending[0] <= due:
                return False
            if pending is not None:
                pending[1].cancel()
            timer = threading.Timer(due - time.monotonic(), self._fire, (key, due))
            timer.daemon = True  # an operator shutting down does not wait for it
            self._pending[key] = (due, timer)
            timer.start()
        return True

    def pending(self, namespace: str, name: str) -> float | None:
        """Seconds until the job's requeue, if one is scheduled."""
        with self._lock:
            found = self._pending.get((namespace, name))
        return max(0.0, found[0] - time.monotonic()) if found is not None else None

    def _fire(self, key: tuple[str, str], due: float) -> None:
        with self._lock:
            if self._pending.get(key, (None,))[0] == due:
                del self._pending[key]
        try:
            self._reconcile(*key)
        except Exception:  # reconcile logs and counts its errors; the next trigger tries again
            log.debug("requeued reconcile failed", extra={"namespace": key[0], "job": key[1]})
