"""Pipelined generation: micro-batches of lanes flow through the stages; the last stage samples and
sends the tokens back to the first.

Every rank of a replica group runs ``run_generation``. Stage 0 schedules (``Scheduler``, here); the
other stages follow the work items it sends (``StageWorker.follow``, stage.py), so the schedule lives
in one place. Work items:

* prefill: the prompts of the sequences joining in a turn [k, S] into their lanes (padded on the right
  to the longest, the padding at the scratch position); a prompt longer than ``prefill_chunk`` goes
  alone, in chunks, one a turn, so decode steps of the other lanes run between its chunks;
* extend: a later chunk of such a prompt [1, C], attending to the lane's cache;
* decode: one token for every lane of a micro-batch [b, 1] (static shape; idle lanes write to the
  cache's scratch slot and their token is ignored);
* stop: the end.

The lanes are split into M micro-batches (default: one per stage). Stage 0 visits them in turn: it
collects the tokens of the micro-batch's previous items, retires finished sequences, admits waiting
ones into free lanes (prefill) and sends the next decode item. With M >= P the reply for a micro-batch
is back by the time its turn comes again, so while stage s decodes micro-batch i, stage s+1 decodes
i-1, and no stage waits between tokens. Sequences join and leave at any token step (continuous
batching), which is what serve mode needs too: there the requests come from a ``RequestQueue``
(requests.py) that the HTTP server feeds while the loop runs (the loop blocks on it when it has nothing
to do), and a cancelled request's lane is freed at its micro-batch's next turn.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from conveyor.inference.incremental_text import StopMatcher
from conveyor.inference.model.stage_model import StageModel
from conveyor.inference.pipeline.requests import (
    IteratedRequests,
    ReplicatedQueue,
    Request,
    RequestQueue,
    Result,
)
from conveyor.inference.pipeline.sampling import SamplingParams
from conveyor.inference.pipeline.stage import (
    DECODE,
    EXTEND,
    HEADER,
    IDLE,
    PREFILL,
    PipelinePeers,
    StageWorker,
)

__all__ = [
    "BATCH",
    "IMMEDIATE",
    "Admission",
    "PipelinePeers",
    "ReplicatedQueue",
    "Request",
    "RequestQueue",
    "Result",
    "SchedulerHooks",
    "StageWorker",
    "run_generation",
]

# An item reads the keys of [0, kv_len), kv_len the longest sequence's length rounded up to a block, where
# the pass runs eagerly (a compiled or captured decode step reads up to each query's own position).
KV_BLOCK = 64
# Prompt passes are at least this many tokens wide (padded at the scratch position): dynamo gives sizes
# 0 and 1 graphs of their own, so a one-token prompt or last chunk would compile mid-run.
MIN_PROMPT_WIDTH = 2
# Prompts admitted in one turn are prefilled together, up to this many (padded) tokens per item.
PREFILL_TOKENS = 8192
# A longer prompt is prefilled in chunks of this many tokens, one chunk a turn.
PREFILL_CHUNK = 2048
# An idle scheduler (serve mode, no requests) wakes this often and tells the other stages it is alive:
# their blocking receive would otherwise hit the process group's timeout.
KEEPALIVE_SECONDS = 30.0


class TokenReadback:
    """Tokens [n] on the device, copied to the host without stopping the device's queue: the copy is
    queued behind the step that samples them, and only ``get()`` waits, for that step alone."""

    def __init__(self, tokens: torch.Tensor):
        self.event: torch.cuda.Event | None = None
        if tokens.device.type == "cuda":
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tokens

    def get(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return list(self.host.tolist())


@dataclass(frozen=True)
class Admission:
    """When waiting prompts take free lanes. A prompt pass launches every layer's kernels whatever its
    size: eagerly on an H200 (7B shape) one prompt of 160 tokens took 33 ms, 50 of them 233 ms, and a
    decode step of 256 lanes 13 ms (docs/performance.md). Admitted as lanes free up, one or two a step
    (sequences ending at their own EOS), prompts would cost more than the decoding around them. So a
    batch job lets free lanes gather (``BATCH``): prompts join a micro-batch once ``min_free`` of its
    lanes are free, or once a lane has been free ``max_wait`` turns, or when none of its lanes is busy
    (TGI's router waits alike: waiting_served_ratio, max_waiting_tokens). Serve mode admits at once
    (``IMMEDIATE``): a request's first token waits for nothing. Which lanes a sequence shares, and when
    it joins, never changes its tokens."""

    min_free: float = 0.0  # fraction of a micro-batch's lanes
    max_wait: int = 0  # turns (one decode step of each micro-batch)

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_free <= 1.0 or self.max_wait < 0:
            raise ValueError(f"admission: min_free in [0, 1] and max_wait >= 0, got {self}")


IMMEDIATE = Admission()
BATCH = Admission(min_free=0.125, max_wait=16)


@dataclass
class _Lane:
    request: Request | None = None
    free_since: int = 0  # the turn it was freed (a free lane)
    output: list[int] = field(default_factory=list)  # tokens read back so far
    prefilled: int = 0  # prompt tokens sent into the cache
    scheduled: int = 0  # tokens whose sampling is queued (the step of the next one)
    has_token: bool = False  # its last sampled token is in next_token (on the device)
    started: float = 0.0
    first_token: float = 0.0
    stops: StopMatcher | None = None  # its request's stop strings and the engine's, where there are any


@dataclass
class _Item:
    """A work item stage 0 sent and whose tokens have not been read back."""

    kind: int
    lane_start: int
    lanes: list[tuple[int, Request]]  # the lanes it samples for, and their requests when it was sent
    readback: TokenReadback | None = None
    final: bool = True  # False: a prompt chunk before the last (its token is not wanted)


@dataclass
class SchedulerHooks:
    """Callbacks for metrics and progress; all optional."""

    on_result: Callable[[Result], None] = lambda r: None
    on_first_token: Callable[[float], None] = lambda dt: None
    on_decode_step: Callable[[float, int], None] = lambda dt, tokens: None
    on_wait: Callable[[float], None] = lambda dt: None
    on_token: Callable[[Request, int], None] = lambda request, token: None  # each token accepted, in order
    # once a pass over the micro-batches: sequences in lanes, KV cache positions they hold
    on_occupancy: Callable[[int, int], None] = lambda running, positions: None


class Scheduler:
    """Stage 0: owns the lanes, admits and retires sequences, keeps M micro-batches in flight.

    The host never waits for the step it has just queued. A micro-batch's turn: (1) take the replies of
    the items it sent last turn (tokens, on the device) into ``next_token`` and queue their copy to the
    host; (2) queue the next decode step, which reads its input tokens from ``next_token``; (3) read
    back the tokens of (1), which waits only for the previous step while the new one runs; retire
    finished sequences; (4) admit waiting ones into free lanes. So the host decides step t knowing the
    tokens of step t-2: a sequence that stops at t-1 (stop token or string) runs one extra step, whose
    token is dropped. Length limits are known ahead and never cost a step."""

    def __init__(
        self,
        worker: StageWorker,
        micro_batches: int,
        lanes_per_micro_batch: int,
        tokenizer: Any = None,
        hooks: SchedulerHooks | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        admission: Admission = IMMEDIATE,
    ):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.worker, self.m, self.b, self.chunk = worker, micro_batches, lanes_per_micro_batch, prefill_chunk
        self.tokenizer, self.hooks = tokenizer, hooks or SchedulerHooks()
        self.admission = admission
        self.turn = 0  # passes over the micro-batches
        self.lanes = [_Lane() for _ in range(micro_batches * lanes_per_micro_batch)]
        self.next_token = torch.zeros(len(self.lanes), dtype=torch.int64, device=worker.device)
        self.stop_ids = set(worker.params.stop_token_ids)
        self.max_len = worker.scratch
        self._local_replies: deque[torch.Tensor] = deque()

    # -- the channel to the rest of the pipeline -------------------------------------------------
    def _submit(self, meta: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
        out = self.worker.execute(meta, None, tokens)
        p = self.worker.peers
        if p.is_last:
            self._local_replies.append(out)
        else:
            assert p.next_rank is not None
            self.worker.channel.send_item(meta, out, p.next_rank)

    def _reply(self, n: int) -> torch.Tensor:
        """The tokens [n] of the oldest item not yet taken (a receive from the last stage, queued)."""
        if self._local_replies:
            return self._local_replies.popleft()
        t0 = time.perf_counter()
        tokens = self.worker.channel.recv_payload((n,), self.worker.peers.last_rank, torch.int64)
        self.hooks.on_wait(time.perf_counter() - t0)
        return tokens.to(self.next_token.device)

    # -- sequences ------------------------------------------------------------------------------
    def _may_decode(self, lane: _Lane) -> bool:
        req = lane.request
        return (
            req is not None
            and lane.has_token
            and lane.scheduled < req.max_new_tokens
            and len(req.prompt_ids) + lane.scheduled < self.max_len
        )

    def _finish_reason(self, lane: _Lane) -> str | None:
        req = lane.request
        assert req is not None
        if lane.output[-1] in self.stop_ids:
            return "stop"
        if lane.stops is not None and lane.stops.add(lane.output[-1]):
            return "stop"
        if len(lane.output) >= req.max_new_tokens or len(req.prompt_ids) + len(lane.output) >= self.max_len:
            return "length"
        return None

    def _accept(self, index: int, token: int, now: float) -> None:
        lane = self.lanes[index]
        assert lane.request is not None
        if not lane.output:
            lane.first_token = now
            self.hooks.on_first_token(now - lane.started)
        lane.output.append(token)
        self.hooks.on_token(lane.request, token)
        reason = self._finish_reason(lane)
        if reason is None:
            return
        req = lane.request
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(lane.output, skip_special_tokens=True)
            for s in (*self.worker.params.stop, *req.stop):
                if s in text:
                    text = text[: text.index(s)]
        self.lanes[index] = _Lane(free_since=self.turn)
        self.hooks.on_result(
            Result(req.id, req.prompt_ids, lane.output, reason, text, lane.first_token - lane.started)
        )

    def _admit(self, index: int, req: Request) -> None:
        if not req.prompt_ids:
            raise ValueError(f"request {req.id!r} has an empty prompt")
        if len(req.prompt_ids) >= self.max_len:
            raise ValueError(
                f"request {req.id!r}: prompt of {len(req.prompt_ids)} tokens leaves no room in a "
                f"KV cache of {self.max_len} positions"
            )
        stops = (*self.worker.params.stop, *req.stop)
        matcher = StopMatcher(self.tokenizer, stops) if stops and self.tokenizer is not None else None
        self.lanes[index] = _Lane(request=req, scheduled=1, started=time.perf_counter(), stops=matcher)

    def _prefill(self, joining: list[tuple[int, Request]]) -> _Item:
        """One item for the prompts of ``joining`` (lane, request), right-padded to the longest: the
        padding sits at the scratch position, so it writes only the scratch slot, and causal attention
        keeps it out of every real token's view."""
        s = max(MIN_PROMPT_WIDTH, *(len(req.prompt_ids) for _, req in joining))
        positions = torch.full((len(joining), s), self.max_len, dtype=torch.int64)  # [k, S]
        tokens = torch.zeros(len(joining), s, dtype=torch.int64)
        for j, (_, req) in enumerate(joining):
            positions[j, : len(req.prompt_ids)] = torch.arange(len(req.prompt_ids))
            tokens[j, : len(req.prompt_ids)] = torch.tensor(req.prompt_ids)
        lanes = [i for i, _ in joining]
        for i in lanes:
            self.lanes[i].prefilled = len(self.lanes[i].request.prompt_ids)  # type: ignore[union-attr]
        keys = [req.key for _, req in joining]
        self._submit(
            self.worker.pack(
                PREFILL,
                lanes[0],
                positions,
                keys,
                [0] * len(joining),
                tokens,
                lanes=lanes,
                sampling=[req.sampling for _, req in joining]
                if any(r.sampling for _, r in joining)
                else None,
            )
        )
        return _Item(PREFILL, lanes[0], joining)

    def _kv_len(self, longest: int) -> int:
        """The cache slots an item reads: ``longest`` rounded up to a KV block, at most the cache."""
        return min(-(-longest // KV_BLOCK) * KV_BLOCK, self.max_len + 1)

    def _chunk(self, index: int) -> _Item:
        """The next chunk of a long prompt: the first as a prefill, later ones extend the lane's cache."""
        lane = self.lanes[index]
        req = lane.request
        assert req is not None
        c0 = lane.prefilled
        c1 = min(c0 + self.chunk, len(req.prompt_ids))
        final = c1 == len(req.prompt_ids)
        kind = PREFILL if c0 == 0 else EXTEND
        width = max(MIN_PROMPT_WIDTH, c1 - c0)  # padded at the scratch position, as prefills are
        positions = torch.full((1, width), self.max_len, dtype=torch.int64)  # [1, C]
        positions[0, : c1 - c0] = torch.arange(c0, c1)
        tokens = torch.zeros(1, width, dtype=torch.int64)
        tokens[0, : c1 - c0] = torch.tensor(req.prompt_ids[c0:c1])
        kv_len = self._kv_len(c1)
        step = 0 if final else -1  # -1: the last stage keeps no token for it
        sampling: list[SamplingParams | None] | None = (
            [req.sampling] if kind == PREFILL and req.sampling else None
        )
        self._submit(
            self.worker.pack(kind, index, positions, [req.key], [step], tokens, kv_len, [index], sampling)
        )
        lane.prefilled = c1
        return _Item(kind, index, [(index, req)], final=final)

    def _decode(self, mb: int) -> _Item | None:
        start = mb * self.b
        active = [i for i in range(start, start + self.b) if self._may_decode(self.lanes[i])]
        if not active:
            return None
        # Built as lists, then one tensor: a tensor written element by element cost 1.9 ms a step of
        # host time at 256 lanes (on a CPU core of this class), for the Python it took to index.
        at = [self.max_len] * self.b  # idle lanes: scratch slot
        keys, steps = [0] * self.b, [0] * self.b
        for i in active:
            lane, j = self.lanes[i], i - start
            assert lane.request is not None
            # the token sampled at step k - 1 goes in at position len(prompt) + k - 1
            at[j] = len(lane.request.prompt_ids) + lane.scheduled - 1
            keys[j], steps[j] = lane.request.key, lane.scheduled
            lane.scheduled += 1
        kv_len = self._kv_len(max(at[i - start] for i in active) + 1)
        positions = torch.tensor(at, dtype=torch.int64).view(self.b, 1)
        meta = self.worker.pack(DECODE, start, positions, keys, steps, kv_len=kv_len)
        self._submit(meta, self.next_token[start : start + self.b, None])
        return _Item(DECODE, start, [(i, self.lanes[i].request) for i in active])  # type: ignore[misc]

    def _receive(self, item: _Item) -> None:
        """The item's tokens into ``next_token`` (device order: the replies come in the order sent, so a
        lane's newest token lands last), and their copy to the host queued."""
        tokens = self._reply(self.b if item.kind == DECODE else len(item.lanes))
        if not item.final:
            return  # a prompt chunk before the last: nothing to keep
        if item.kind != DECODE:
            lanes = [i for i, _ in item.lanes]
            self.next_token[torch.tensor(lanes, device=self.next_token.device)] = tokens
            for i in lanes:
                self.lanes[i].has_token = True
        else:
            # The whole micro-batch, idle lanes included: an idle lane is free or finished (its token is
            # never read), and a lane admitted this turn gets its first token from its prefill, later.
            self.next_token[item.lane_start : item.lane_start + tokens.shape[0]] = tokens
        item.readback = TokenReadback(tokens)

    def _read(self, item: _Item) -> int:
        """Accept the item's tokens read back on the host; returns how many were taken."""
        if not item.final:
            return 0
        assert item.readback is not None
        t0 = time.perf_counter()
        tokens, now, taken = item.readback.get(), time.perf_counter(), 0
        if self.worker.peers.stages > 1:  # on NCCL the receive is queued: the wait shows here
            self.hooks.on_wait(now - t0)
        for j, (index, req) in enumerate(item.lanes):
            if self.lanes[index].request is not req:  # it finished before this (extra) step was read
                continue
            self._accept(index, tokens[index - item.lane_start if item.kind == DECODE else j], now)
            taken += 1
        return taken

    def _cancel(self, request_ids: set[Any]) -> None:
        """Free the lanes of cancelled requests. Their items still in flight are harmless, as a finished
        sequence's extra step is: a reply is read only for the request its item was sent for, and a
        lane's next prefill is sent (so received) after them."""
        for i, lane in enumerate(self.lanes):
            req = lane.request
            if req is not None and req.id in request_ids:
                self.lanes[i] = _Lane(free_since=self.turn)
                self.hooks.on_result(
                    Result(
                        req.id,
                        req.prompt_ids,
                        lane.output,
                        "cancelled",
                        None,
                        lane.first_token - lane.started,
                    )
                )

    def _admitting(self, mb: int) -> bool:
        """Whether waiting prompts may join micro-batch ``mb`` this turn (``Admission``)."""
        lanes = self.lanes[mb * self.b : (mb + 1) * self.b]
        free = [lane for lane in lanes if lane.request is None]
        if not free:
            return False
        a = self.admission
        return (
            len(free) >= max(1, math.ceil(a.min_free * self.b))
            or len(free) == len(lanes)
            or self.turn - min(lane.free_since for lane in free) >= a.max_wait
        )

    def _occupancy(self) -> None:
        running, positions = 0, 0
        for lane in self.lanes:
            if lane.request is not None:
                running += 1
                positions += len(lane.request.prompt_ids) + len(lane.output)
        self.hooks.on_occupancy(running, positions)

    def run(self, requests: Iterable[Request] | RequestQueue | ReplicatedQueue) -> None:
        """Generate for ``requests`` until they are exhausted (an iterable) or the queue is closed and
        everything admitted has finished (a ``RequestQueue``: an empty queue is waited on, not the end)."""
        waiting: RequestQueue | ReplicatedQueue | IteratedRequests = (
            requests if isinstance(requests, (RequestQueue, ReplicatedQueue)) else IteratedRequests(requests)
        )
        in_flight: list[list[_Item]] = [[] for _ in range(self.m)]  # per micro-batch, in the order sent
        last_turn = [time.perf_counter()] * self.m
        while True:
            busy = False
            if cancelled := waiting.take_cancelled():
                self._cancel(cancelled)
            for mb in range(self.m):
                received, in_flight[mb] = in_flight[mb], []
                for item in received:
                    self._receive(item)
                step = self._decode(mb)
                if step is not None:
                    in_flight[mb].append(step)
                decoded = sum(self._read(item) for item in received if item.kind == DECODE)
                for item in received:
                    if item.kind != DECODE:
                        self._read(item)
                if decoded:
                    now = time.perf_counter()
                    self.hooks.on_decode_step(now - last_turn[mb], decoded)
                    last_turn[mb] = now
                # The next chunk of each long prompt in progress (one a turn: decode runs between).
                for i in range(mb * self.b, (mb + 1) * self.b):
                    lane = self.lanes[i]
                    if lane.request is not None and 0 < lane.prefilled < len(lane.request.prompt_ids):
                        in_flight[mb].append(self._chunk(i))
                # Admit waiting sequences into free lanes of this micro-batch (they join now), in the
                # order they came, when the admission policy says so; their prompts are prefilled
                # together (prefill_groups).
                joining: list[tuple[int, Request]] = []
                for i in range(mb * self.b, (mb + 1) * self.b) if self._admitting(mb) else ():
                    if self.lanes[i].request is None:
                        req = waiting.poll()
                        if req is None:
                            break
                        self._admit(i, req)
                        if len(req.prompt_ids) > self.chunk:
                            in_flight[mb].append(self._chunk(i))
                        else:
                            joining.append((i, req))
                in_flight[mb].extend(self._prefill(group) for group in prefill_groups(joining))
                busy = busy or bool(in_flight[mb])
            self._occupancy()
            self.turn += 1
            if not busy:
                if waiting.finished:
                    break
                # idle: sleep until a request (or close) arrives; on a timeout tell the other stages
                if not waiting.wait(KEEPALIVE_SECONDS) and self.worker.peers.next_rank is not None:
                    keepalive = torch.zeros(HEADER, dtype=torch.int64)
                    keepalive[0] = IDLE
                    self.worker.channel.send_meta(keepalive, self.worker.peers.next_rank)
        p = self.worker.peers
        if p.next_rank is not None:
            stop = torch.zeros(HEADER, dtype=torch.int64)  # kind STOP
            self.worker.channel.send_meta(stop, p.next_rank)
        self.worker.channel.flush()


def prefill_groups(joining: list[tuple[int, Request]]) -> list[list[tuple[int, Request]]]:
    """The prompts joining in one turn, as prefill items of at most PREFILL_TOKENS padded tokens each.
    Shortest first, so that each item is padded to a length near its prompts' own: in arrival order a
    wave of prompts of 32-255 tokens padded about 40% of the tokens of its passes, work the GPU did for
    nothing. An item of one prompt may be longer (up to the prefill chunk)."""
    groups: list[list[tuple[int, Request]]] = []
    group: list[tuple[int, Request]] = []
    for lane, req in sorted(joining, key=lambda j: len(j[1].prompt_ids)):
        if group and len(req.prompt_ids) * (len(group) + 1) > PREFILL_TOKENS:  # (it is the longest)
            groups.append(group)
            group = []
        group.append((lane, req))
    return [*groups, group] if group else groups


def micro_batch_layout(batch_size: int, micro_batches: int) -> tuple[int, int]:
    """(micro-batches, lanes per micro-batch) for ``batch_size`` sequences in flight."""
    m = max(1, min(micro_batches, batch_size))
    return m, math.ceil(batch_size / m)


def run_generation(
    model: StageModel,
    peers: PipelinePeers,
    params: SamplingParams,
    requests: Iterable[Request] | RequestQueue | ReplicatedQueue,
    *,
    micro_batches: int,
    lanes_per_micro_batch: int,
    device: torch.device,
    tokenizer: Any = None,
    hooks: SchedulerHooks | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    admission: Admission = IMMEDIATE,
) -> None:
    """Every rank of a replica group calls this; stage 0 consumes ``requests`` and reports results
    through ``hooks.on_result`` (other stages ignore ``requests``); ``admission``: when waiting
    prompts take free lanes."""
    lanes = micro_batches * lanes_per_micro_batch
    if model.cache is not None and model.cache.lanes_total < lanes:
        raise ValueError(
            f"{micro_batches} micro-batches of {lanes_per_micro_batch} lanes need a KV cache of {lanes} lanes; "
            f"this stage's has {model.cache.lanes_total}: pass lanes={lanes} to prepare_rank or setup_cache"
        )
    worker = StageWorker(model, peers, params, device)
    if peers.is_first:
        Scheduler(
            worker, micro_batches, lanes_per_micro_batch, tokenizer, hooks, prefill_chunk, admission
        ).run(requests)
    else:
        worker.follow()
