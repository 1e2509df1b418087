"""How far a batch job is: prompts done, output tokens a second and the time left, logged as it goes
(``conveyor run`` shows these lines; in a cluster they are the pod's log)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class RunProgress:
    """Counts results; ``report()`` returns the fields of a progress line when one is due (every
    ``every`` seconds, and for the last result), else None. Rates count this run's work only (a
    restarted job's committed prompts are in ``completed``, not in the rate)."""

    def __init__(
        self, total: int, completed: int, every: float = 5.0, clock: Callable[[], float] = time.monotonic
    ):
        self.total, self.completed, self.every, self.clock = total, completed, every, clock
        self.start = self.last = clock()
        self.done_here = self.tokens = 0

    def result(self, output_tokens: int) -> dict[str, Any] | None:
        self.completed += 1
        self.done_here += 1
        self.tokens += output_tokens
        now = self.clock()
        if now - self.last < self.every and self.completed < self.total:
            return None
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        per_prompt = elapsed / self.done_here
        return {
            "completed": self.completed,
            "total": self.total,
            "percent": round(100 * self.completed / max(self.total, 1), 1),
            "tokens_per_second": round(self.tokens / elapsed, 1),
            "prompts_per_second": round(self.done_here / elapsed, 2),
            "eta_seconds": round(per_prompt * (self.total - self.completed), 1),
        }
