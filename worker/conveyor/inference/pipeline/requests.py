"""What generation is asked and what it answers, and where requests wait for a lane.

A ``Request`` (a prompt, its limits, its own sampling) becomes a ``Result``. The scheduler (generate.py)
takes requests from one of three sources, which answer the same questions: a plain iterable (the batch
job: ``IteratedRequests``), a ``RequestQueue`` that serve mode's HTTP threads fill while the loop runs,
and a ``ReplicatedQueue``, the entry rank's queue as its tensor-parallel peers see it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from conveyor.inference.pipeline.sampling import SamplingParams, sequence_key


@dataclass
class Request:
    id: Any
    prompt_ids: list[int]
    max_new_tokens: int
    stop: tuple[str, ...] = ()  # stop strings of this request, besides the sampling parameters' own
    sampling: SamplingParams | None = None  # this request's own temperature, top_k, top_p, seed
    # what its random draws are keyed by (default: its id): a client's seed, so that the same seed and
    # prompt give the same text whatever else is in flight
    sampling_key: Any = None

    @property
    def key(self) -> int:
        return sequence_key(self.id if self.sampling_key is None else self.sampling_key)


@dataclass
class Result:
    id: Any
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str  # "stop", "length", or "cancelled" (RequestQueue.cancel)
    text: str | None = None
    time_to_first_token: float = 0.0


class RequestQueue:
    """Requests that arrive while the scheduler runs (serve mode); thread-safe. ``put`` from any thread
    (``QueueFull`` past ``max_waiting``, ``Closed`` once closed), ``cancel`` a request by id (dropped if
    still waiting, else its lane is freed at its next turn, reported with finish_reason "cancelled"),
    ``close`` to end the run once what is in flight has finished."""

    class QueueFull(Exception):
        pass

    class Closed(Exception):
        """``put`` after ``close``: the replica is stopping and takes no more requests."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._cancelled: set[Any] = set()
        self._closed = False

    def put(self, request: Request) -> None:
        with self._cond:
            if self._closed:
                raise RequestQueue.Closed("the request queue is closed")
            if len(self._waiting) >= self.max_waiting:
                raise RequestQueue.QueueFull(f"{len(self._waiting)} requests already waiting")
            self._waiting.append(request)
            self._cond.notify()

    def cancel(self, request_id: Any) -> None:
        with self._cond:
            kept = deque(r for r in self._waiting if r.id != request_id)
            if len(kept) == len(self._waiting):
                self._cancelled.add(request_id)  # admitted already (or finished: then ignored)
            self._waiting = kept
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def __len__(self) -> int:
        with self._cond:
            return len(self._waiting)

    # -- the scheduler's side ---------------------------------------------------------------------
    def poll(self) -> Request | None:
        with self._cond:
            return self._waiting.popleft() if self._waiting else None

    def take_cancelled(self) -> set[Any]:
        with self._cond:
            taken, self._cancelled = self._cancelled, set()
            return taken

    @property
    def finished(self) -> bool:
        """Closed, and nothing left waiting."""
        with self._cond:
            return self._closed and not self._waiting

    def wait(self, timeout: float) -> bool:
        """Block until a request or a cancellation arrives or the queue closes (True), or ``timeout``
        passes (False)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: bool(self._waiting or self._cancelled or self._closed), timeout
            )


class ReplicatedQueue:
    """The entry rank's ``RequestQueue`` as stage 0's other tensor-parallel ranks see it. Each of those
    ranks runs the same scheduler over the same lanes, so they must get the same answer to every question
    the scheduler asks the queue (a request or none, the cancellations, a wait's outcome, whether it is
    finished): the entry rank (``queue`` given) answers, and the answer is broadcast over the stage's
    tensor-parallel group (``queue`` None on the others). The calls come in the same order on every rank
    because the scheduler's state is the same on every rank: it follows from the answers and the tokens."""

    def __init__(self, queue: RequestQueue | None, group: Any, src: int):
        self.queue, self.group, self.src = queue, group, src

    def _agree(self, answer: Callable[[], Any]) -> Any:
        import torch.distributed as dist

        box = [answer() if self.queue is not None else None]
        dist.broadcast_object_list(box, src=self.src, group=self.group)
        return box[0]

    def poll(self) -> Request | None:
        return self._agree(lambda: self.queue.poll())  # type: ignore[union-attr]

    def take_cancelled(self) -> set[Any]:
        return self._agree(lambda: self.queue.take_cancelled())  # type: ignore[union-attr]

    @property
    def finished(self) -> bool:
        return self._agree(lambda: self.queue.finished)  # type: ignore[union-attr]

    def wait(self, timeout: float) -> bool:
        return self._agree(lambda: self.queue.wait(timeout))  # type: ignore[union-attr]


class IteratedRequests:
    """A plain iterable of requests as a ``RequestQueue``'s scheduler side (the batch job's case)."""

    def __init__(self, requests: Iterable[Request]):
        self._it: Iterator[Request] = iter(requests)
        self.finished = False

    def poll(self) -> Request | None:
        req = None if self.finished else next(self._it, None)
        self.finished = req is None
        return req

    def take_cancelled(self) -> set[Any]:
        return set()

    def wait(self, timeout: float) -> bool:
        return True
