"""The generation loop's schedule, checked offline: the real ``Scheduler`` (generate.py) and the real
``StageWorker.follow`` (stage.py) run for P stages against a fake pipeline, without torch.distributed
or a model, and what every rank sent and received is validated.

Deadlocks are the worst failure to debug on a cluster: a rank waits forever for a message nobody sends,
or posts a receive of a shape nobody sends. Here each rank of a pipeline is a thread that runs the code
it runs on the cluster (stage 0 the scheduler, the others ``follow``) with ``FakeStageWorker`` (no
model: the last stage "samples" ``fake_token(key, step)``) and ``FakeChannel`` (p2p.Channel's interface,
recording every message). The network is the one p2p.py relies on: sends never block (isend), a receive
blocks until its message arrives, and messages on a link (src, dst, metadata or payload) arrive in the
order sent. A blocking receive is stricter than NCCL's queued one, so a schedule that finishes here
never waits there for a message that does not come.

One rank runs at a time and hands on when it must wait, so a run is deterministic and a deadlock exact:
every unfinished rank waits on a link with nothing on it.

``check_generation`` raises ``ScheduleError`` with a step x rank grid (each rank's items ``D[2,1]``,
sends ``>1 h[2,1,8]`` and receives ``<0 D[2,1]``, in its own order; ``>`` marks where a rank failed or
waits) unless:

- every send meets a receive of the same shape and dtype (metadata: the same contents), in order, on
  each link (stage s -> s + 1, and the last stage -> stage 0 for tokens), and nothing is left unreceived;
- the stop item reaches every stage and every rank returns;
- every request finishes exactly once, with the tokens the fake last stage sampled for it at steps
  0, 1, ... and the finish reason those imply (so replies land in the right lanes, in order), and every
  decode item feeds each lane the token of its previous step.
"""

from __future__ import annotations

import threading
import traceback
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import torch

from conveyor.inference.pipeline.generate import (
    IMMEDIATE,
    PREFILL_CHUNK,
    Admission,
    Request,
    Result,
    Scheduler,
    SchedulerHooks,
)
from conveyor.inference.pipeline.sampling import SamplingParams, sequence_key
from conveyor.inference.pipeline.stage import DECODE, EXTEND, PREFILL, STOP, PipelinePeers, StageWorker
from conveyor.pipe.schedule import ScheduleError

KIND_LETTER = {PREFILL: "P", EXTEND: "E", DECODE: "D", STOP: "X"}
STOP_TOKEN = 0  # the fake model's only stop token; fake_token never returns it by chance
VOCAB = 1000
META, PAYLOAD = "meta", "payload"  # the two groups of p2p.py (gloo metadata, default-group payloads)


def fake_token(key: int, step: int) -> int:
    """The token the fake last stage samples for a sequence at a step (never the stop token)."""
    return 1 + (key * 31 + step * 7) % (VOCAB - 1)


@dataclass
class Event:
    """One thing a rank did: ran an item, sent or received a message (``peer`` is the other rank)."""

    op: str  # "run", "send" or "recv"
    what: str = ""  # META or PAYLOAD
    peer: int | None = None
    label: str = "?"  # item kind letter (metadata, run); a receive not yet matched stays "?"
    shape: tuple[int, ...] = ()  # payload shape; (n, S) of an item
    dtype: torch.dtype | None = None
    meta: torch.Tensor | None = None  # metadata contents

    def __str__(self) -> str:
        if self.what == PAYLOAD:
            body = ("t" if self.dtype == torch.int64 else "h") + str(list(self.shape))
        elif self.label in ("?", "X"):
            body = self.label
        else:
            body = f"{self.label}{list(self.shape)}"
        arrow = {"send": f">{self.peer} ", "recv": f"<{self.peer} "}.get(self.op, "")
        return arrow + body.replace(" ", "")


class _Abort(BaseException):
    """Unwinds a rank's thread once the run has stopped (a rank failed, a mismatch or a deadlock);
    a BaseException so that no ``except Exception`` in the code under test swallows it."""


class _Network:
    """The simulated links between the ranks of one pipeline, and the baton that lets one rank run."""

    def __init__(self, ranks: int):
        self.cond = threading.Condition()
        self.events: list[list[Event]] = [[] for _ in range(ranks)]
        self.links: dict[tuple[int, int, str], deque[tuple[Event, torch.Tensor]]] = defaultdict(deque)
        self.state = ["ready"] * ranks  # ready (not started), running, waiting, done, failed
        self.waits: dict[int, tuple[int, int, str]] = {}
        self.turn = 0
        self.stopped = False
        self.deadlock = False
        self.errors: dict[int, str] = {}  # rank -> what went wrong there

    def enter(self, rank: int) -> None:
        with self.cond:
            self._wait_turn(rank)
            self.state[rank] = "running"

    def _wait_turn(self, rank: int) -> None:
        self.cond.wait_for(lambda: self.turn == rank or self.stopped)
        if self.stopped:
            raise _Abort

    def _hand_on(self, rank: int) -> None:
        """Give the turn to the next rank that can make progress; none: finished, or a deadlock."""
        n = len(self.state)
        for r in [(rank + k) % n for k in range(1, n + 1)]:
            s = self.state[r]
            if s == "ready" or (s == "waiting" and self.links[self.waits[r]]):
                self.turn = r
                self.cond.notify_all()
                return
        self.turn = -1
        if any(s == "waiting" for s in self.state):
            self.deadlock = self.stopped = True
        self.cond.notify_all()

    def send(self, rank: int, event: Event, tensor: torch.Tensor) -> None:
        assert event.peer is not None
        with self.cond:
            self.events[rank].append(event)
            self.links[(rank, event.peer, event.what)].append((event, tensor))

    def recv(self, rank: int, event: Event) -> tuple[Event, torch.Tensor]:
        """Post a receive (recorded at once, so a receive that never completes shows in the grid) and
        wait for the oldest message on its link."""
        assert event.peer is not None
        link = (event.peer, rank, event.what)
        with self.cond:
            self.events[rank].append(event)
            if not self.links[link]:
                self.state[rank], self.waits[rank] = "waiting", link
                self._hand_on(rank)
                self._wait_turn(rank)
                self.state[rank] = "running"
            return self.links[link].popleft()

    def stop(self, rank: int, error: str) -> None:
        with self.cond:
            self.state[rank] = "failed"
            self.errors[rank] = error
            self.stopped = True
            self.cond.notify_all()

    def done(self, rank: int) -> None:
        with self.cond:
            self.state[rank] = "done"
            self._hand_on(rank)


class FakeChannel:
    """p2p.Channel's interface over the simulated network; records every message on its rank."""

    def __init__(self, net: _Network, rank: int, dtype: torch.dtype):
        self.net, self.rank, self.dtype = net, rank, dtype

    def send_meta(self, meta: torch.Tensor, dst: int) -> None:
        meta = meta.to(torch.int64).cpu().clone()
        kind, _, n, s = meta[:4].tolist()
        event = Event("send", META, dst, KIND_LETTER.get(kind, str(kind)), (n, s), meta=meta)
        self.net.send(self.rank, event, meta)

    def send_payload(self, payload: torch.Tensor, dst: int) -> None:
        if payload.dtype not in (self.dtype, torch.int64):  # the refusal of p2p.Channel
            raise TypeError(f"payload of {payload.dtype}; this pipeline sends {self.dtype} (or int64 tokens)")
        event = Event("send", PAYLOAD, dst, shape=tuple(payload.shape), dtype=payload.dtype)
        self.net.send(self.rank, event, payload.detach().clone())

    def send_item(self, meta: torch.Tensor, payload: torch.Tensor, dst: int) -> None:
        self.send_meta(meta, dst)
        self.send_payload(payload, dst)

    def recv_meta(self, src: int) -> torch.Tensor:
        event = Event("recv", META, src)
        sent, meta = self.net.recv(self.rank, event)
        # metadata is length-prefixed: the receiver takes whatever comes (the validator compares contents)
        event.label, event.shape, event.meta = sent.label, sent.shape, meta
        return meta.clone()

    def recv_payload(
        self, shape: tuple[int, ...], src: int, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        event = Event("recv", PAYLOAD, src, shape=tuple(shape), dtype=dtype or self.dtype)
        sent, payload = self.net.recv(self.rank, event)
        if (sent.shape, sent.dtype) != (event.shape, event.dtype):
            # A real receive would hang or read garbage: stop here, the validator names both ends.
            self.net.stop(self.rank, "")
            raise _Abort
        return payload.clone()

    def flush(self) -> None:
        """Sends are delivered as they are made; what is left unreceived the validator reports."""


class FakeStageWorker(StageWorker):
    """A StageWorker without a model: items are checked and "run" into zeros of the right shape; the
    last stage samples ``fake_token(key, step)`` (``STOP_TOKEN`` where ``stop_at[key] == step``).
    ``follow`` and ``pack`` are StageWorker's own."""

    def __init__(
        self,
        net: _Network,
        peers: PipelinePeers,
        params: SamplingParams,
        hidden: int,
        lanes_total: int,
        max_len: int,
        stop_at: dict[int, int],
        names: dict[int, Any] | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        # No StageWorker.__init__: it builds a CUDA-graph runner and a p2p.Channel from a real model.
        self.model = cast(Any, SimpleNamespace(arch=SimpleNamespace(hidden=hidden)))
        self.peers, self.params, self.device = peers, params, torch.device("cpu")
        self.channel = cast(Any, FakeChannel(net, peers.stage, dtype))
        self.scratch, self.seen = max_len, None
        self.net, self.hidden, self.dtype = net, hidden, dtype
        self.lanes_total, self.stop_at = lanes_total, stop_at
        self.cache: dict[int, tuple[int, int]] = {}  # lane -> (sequence key, positions written)
        self.names = names or {}  # sequence key -> request id, for messages

    def execute(
        self, meta: torch.Tensor, hidden: torch.Tensor | None, tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        kind, lane_start, n, s, kv_len = self.header(meta)
        positions, keys, steps, lanes, prompt = self.fields(meta, n, s)
        self.net.events[self.peers.stage].append(Event("run", label=KIND_LETTER.get(kind, "?"), shape=(n, s)))
        self._check_item(
            kind, lane_start, n, s, kv_len, positions, keys, steps, lanes, prompt, hidden, tokens
        )
        if not self.peers.is_last:
            return torch.zeros(n, s, self.hidden, dtype=self.dtype)  # hidden states [n, S, H]
        out = [
            STOP_TOKEN if self.stop_at.get(k) == t else fake_token(k, t)
            for k, t in zip(keys.tolist(), steps.tolist())
        ]
        return torch.tensor(out, dtype=torch.int64)  # tokens [n]

    def _check_item(
        self,
        kind: int,
        lane_start: int,
        n: int,
        s: int,
        kv_len: int,
        positions: torch.Tensor,
        keys: torch.Tensor,
        steps: torch.Tensor,
        lanes: torch.Tensor,
        prompt: torch.Tensor | None,
        hidden: torch.Tensor | None,
        tokens: torch.Tensor | None,
    ) -> None:
        """What a real stage would trip over, or silently compute wrongly from."""
        assert kind in (PREFILL, EXTEND, DECODE), f"item of unknown kind {kind}"
        assert all(0 <= lane < self.lanes_total for lane in lanes.tolist()), (
            f"lanes {lanes.tolist()} outside the cache"
        )
        real = positions != self.scratch  # [n, S]; padding and idle lanes sit at the scratch position
        assert bool((positions[real] < self.scratch).all()), "a position beyond the cache"
        if kind == DECODE:
            assert s == 1 and lanes.tolist() == list(range(lane_start, lane_start + n)), "decode lanes"
        else:
            assert prompt is not None and prompt.shape == (n, s), "a prompt item without its tokens"
        self._check_cache(kind, kv_len, positions, keys, lanes, real)
        if not self.peers.is_first:
            assert hidden is not None and hidden.shape == (n, s, self.hidden)
        elif kind == DECODE:
            assert tokens is not None and tokens.shape == (n, 1), "decode input tokens are not [n, 1]"
            # each active lane is fed the token its sequence sampled at the previous step
            for j in torch.nonzero(real[:, 0]).flatten().tolist():
                key, step = int(keys[j]), int(steps[j])
                want = STOP_TOKEN if self.stop_at.get(key) == step - 1 else fake_token(key, step - 1)
                got = int(tokens[j, 0])
                assert got == want, f"lane {lane_start + j} fed token {got} at step {step}, not {want}"

    def _check_cache(
        self,
        kind: int,
        kv_len: int,
        positions: torch.Tensor,
        keys: torch.Tensor,
        lanes: torch.Tensor,
        real: torch.Tensor,
    ) -> None:
        """The lanes' caches as this stage holds them: which sequence wrote a lane, and how far. A prefill
        writes a lane from position 0, an extend or decode goes on from where the lane's cache ends and
        for the sequence that wrote it; otherwise a real stage attends to holes or to another sequence's
        keys, and no shape check notices."""
        for j, lane in enumerate(lanes.tolist()):
            k = int(real[j].sum())
            if k == 0:
                continue  # an idle decode lane: it writes the scratch slot only
            row = positions[j, :k].tolist()  # [k] real positions; the padding must come after them
            assert bool(real[j, :k].all()), (
                f"lane {lane}: padding before real positions {positions[j].tolist()}"
            )
            assert row == list(range(row[0], row[0] + k)), f"lane {lane}: positions {row} not contiguous"
            key = int(keys[j])
            if kind == PREFILL:
                assert row[0] == 0, f"lane {lane}: a prefill from position {row[0]}"
            else:
                owner, written = self.cache.get(lane, (-1, 0))  # -1: no sequence wrote it yet
                name = {EXTEND: "an extend", DECODE: "a decode"}[kind]
                assert (owner, written) == (key, row[0]), (
                    f"lane {lane}: {name} of {self.names.get(key, key)!r} from position {row[0]}, but its "
                    f"cache holds {written} positions of {self.names.get(owner, 'none')!r}"
                )
                assert kv_len > row[-1], f"lane {lane}: kv_len {kv_len} hides position {row[-1]}"
            self.cache[lane] = (key, row[-1] + 1)


@dataclass
class Trace:
    """What each rank did, in its own order; where each stopped (None: returned); the results."""

    events: list[list[Event]]
    positions: dict[int, int | None]
    errors: dict[int, str]
    deadlock: bool
    results: list[Result] = field(default_factory=list)

    def format_grid(self, marks: dict[int, int] | None = None, context: int | None = None) -> str:
        """Step x rank table; ``>`` marks ``marks[rank]`` (default: where each rank stopped). With
        ``context``, only the steps within that many of a mark."""
        marks = marks if marks is not None else {r: p for r, p in self.positions.items() if p is not None}
        cells = [[str(e) for e in col] for col in self.events]
        width = max([len(c) for col in cells for c in col] + [8]) + 2
        rows = ["step | " + "".join(f"rank {r}".ljust(width) for r in range(len(cells)))]
        where = [
            "done" if self.positions.get(r) is None else f"@{self.positions[r]}" for r in range(len(cells))
        ]
        rows.append("at   | " + "".join(w.ljust(width) for w in where))
        shown = list(range(max([len(c) for c in cells] + [0])))
        if context is not None and marks:
            shown = [i for i in shown if any(abs(i - m) <= context for m in marks.values())]
        last = -1
        for i in shown:
            if i > last + 1:
                rows.append("  ...")
            last = i
            line = []
            for r, col in enumerate(cells):
                text = col[i] if i < len(col) else ""
                line.append(((">" if marks.get(r) == i else " ") + text).ljust(width))
            rows.append(f"{i:4d} | " + "".join(line))
        return "\n".join(rows)


def run_pipeline(
    stages: int,
    micro_batches: int,
    lanes_per_micro_batch: int,
    requests: Iterable[Request],
    *,
    stop_at: dict[Any, int] | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    max_len: int = 64,
    hidden: int | list[int] = 8,
    scheduler: type[Scheduler] = Scheduler,
    admission: Admission = IMMEDIATE,
) -> Trace:
    """Run the generation loop over ``stages`` simulated ranks; returns the trace (no validation).
    ``stop_at[request id] = k``: the fake model samples the stop token at that sequence's step k.
    ``hidden`` per stage (a list) lets a test make the stages disagree."""
    requests = list(requests)
    keyed_stops = {sequence_key(rid): k for rid, k in (stop_at or {}).items()}
    names = {r.key: r.id for r in requests}
    params = SamplingParams(stop_token_ids=(STOP_TOKEN,))
    widths = hidden if isinstance(hidden, list) else [hidden] * stages
    lanes = micro_batches * lanes_per_micro_batch
    net = _Network(stages)
    results: list[Result] = []
    workers = []
    for s in range(stages):
        peers = PipelinePeers(
            stage=s,
            stages=stages,
            prev_rank=s - 1 if s > 0 else None,
            next_rank=s + 1 if s < stages - 1 else None,
            first_rank=0,
            last_rank=stages - 1,
        )
        workers.append(FakeStageWorker(net, peers, params, widths[s], lanes, max_len, keyed_stops, names))

    def body(rank: int) -> None:
        if rank == 0:
            hooks = SchedulerHooks(on_result=results.append)
            scheduler(
                workers[0], micro_batches, lanes_per_micro_batch, None, hooks, prefill_chunk, admission
            ).run(requests)
        else:
            workers[rank].follow()

    def rank_main(rank: int) -> None:
        try:
            net.enter(rank)
            body(rank)
        except _Abort:
            return
        except Exception as e:
            where = traceback.extract_tb(e.__traceback__)[-1]
            net.stop(rank, f"{type(e).__name__}: {e} ({where.filename.rsplit('/', 1)[-1]}:{where.lineno})")
            return
        net.done(rank)

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(stages)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        if t.is_alive():  # the baton is lost: a bug of this module, not of the schedule
            raise RuntimeError("schedule_check: a simulated rank did not return")
    positions = {r: None if net.state[r] == "done" else max(len(net.events[r]) - 1, 0) for r in range(stages)}
    return Trace(net.events, positions, net.errors, net.deadlock, results)


def expected_output(req: Request, max_len: int, stop_step: int | None) -> tuple[list[int], str]:
    """The tokens and finish reason the Scheduler must report for ``req`` under the fake model."""
    out: list[int] = []
    while True:
        k = len(out)
        out.append(STOP_TOKEN if stop_step == k else fake_token(req.key, k))
        if out[-1] == STOP_TOKEN:
            return out, "stop"
        if len(out) >= req.max_new_tokens or len(req.prompt_ids) + len(out) >= max_len:
            return out, "length"


def link_problems(trace: Trace, leftovers: bool = True) -> tuple[list[str], dict[int, int]]:
    """Per link (src, dst, group), sends and receives paired in order; returns the problems and the
    step of each rank to mark (its first problem). ``leftovers``: also report sends never received and
    receives never sent (not after a rank failed: the others stopped mid-way)."""
    sides: dict[tuple[int, int, str], dict[str, list[tuple[int, Event]]]] = defaultdict(
        lambda: {"send": [], "recv": []}
    )
    for rank, events in enumerate(trace.events):
        for i, e in enumerate(events):
            if e.op in ("send", "recv"):
                assert e.peer is not None
                link = (rank, e.peer, e.what) if e.op == "send" else (e.peer, rank, e.what)
                sides[link][e.op].append((i, e))
    problems: list[str] = []
    marks: dict[int, int] = {}

    def flag(rank: int, step: int, text: str) -> None:
        problems.append(f"rank {rank} step {step}: {text}")
        marks.setdefault(rank, step)

    for (src, dst, what), ends in sorted(sides.items()):
        sends, recvs = ends["send"], ends["recv"]
        for (si, se), (ri, got) in zip(sends, recvs):
            same = (
                torch.equal(se.meta, got.meta)
                if what == META and se.meta is not None and got.meta is not None
                else (se.shape, se.dtype) == (got.shape, got.dtype)
            )
            if not same:
                flag(dst, ri, f"receives {got} from rank {src}, but rank {src} step {si} sent {se}")
                marks.setdefault(src, si)
                break
        else:
            if not leftovers:
                continue
            for si, se in sends[len(recvs) :]:
                flag(src, si, f"sends {se} that rank {dst} never receives")
            for ri, _ in recvs[len(sends) :]:
                flag(dst, ri, f"waits for {what} from rank {src} that is never sent")
    return problems, marks


def validate(
    trace: Trace, requests: list[Request], max_len: int, stop_at: dict[Any, int] | None = None
) -> None:
    """Raise ScheduleError, with the grid, unless the trace meets every rule of the module docstring."""
    stop_at = stop_at or {}
    problems, marks = link_problems(trace, leftovers=not trace.errors)
    for rank, error in sorted(trace.errors.items()):
        if error:
            step = trace.positions[rank] or 0
            problems.append(f"rank {rank} step {step}: failed: {error}")
            marks.setdefault(rank, step)
    if trace.deadlock:
        waiting = [r for r, p in trace.positions.items() if p is not None and r not in trace.errors]
        problems.append(f"deadlock: ranks {waiting} wait at the marked steps and no message can come")
        for r in waiting:
            marks.setdefault(r, trace.positions[r] or 0)
    for rank in range(1, len(trace.events)):
        recvs = [i for i, e in enumerate(trace.events[rank]) if e.op == "recv"]
        stops = [i for i in recvs if trace.events[rank][i].label == "X"]
        if trace.positions[rank] is None and stops != recvs[-1:]:
            problems.append(f"rank {rank}: the stop item is not its last receive (stop at steps {stops})")
    if not problems:  # results only mean something once the pipeline ran to the end
        seen: dict[Any, int] = defaultdict(int)
        for res in trace.results:
            seen[res.id] += 1
        for req in requests:
            count = seen.pop(req.id, 0)
            if count != 1:
                problems.append(f"request {req.id!r} finished {count} times")
                continue
            got = next(r for r in trace.results if r.id == req.id)
            want = expected_output(req, max_len, stop_at.get(req.id))
            if (got.output_ids, got.finish_reason) != want:
                problems.append(
                    f"request {req.id!r}: {got.output_ids} ({got.finish_reason}), expected {want[0]} ({want[1]})"
                )
        problems += [f"result for unknown request {rid!r}" for rid in seen]
    if problems:
        raise ScheduleError(
            "generation schedule check failed:\n  "
            + "\n  ".join(problems)
            + "\n"
            + trace.format_grid(marks or None, context=12)
        )


def check_generation(
    stages: int,
    micro_batches: int,
    lanes_per_micro_batch: int,
    requests: Iterable[Request],
    *,
    stop_at: dict[Any, int] | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    max_len: int = 64,
    hidden: int | list[int] = 8,
    scheduler: type[Scheduler] = Scheduler,
    admission: Admission = IMMEDIATE,
) -> Trace:
    """Run (``run_pipeline``) and ``validate``; returns the trace of a valid run."""
    requests = list(requests)
    trace = run_pipeline(
        stages,
        micro_batches,
        lanes_per_micro_batch,
        requests,
        stop_at=stop_at,
        prefill_chunk=prefill_chunk,
        max_len=max_len,
        hidden=hidden,
        scheduler=scheduler,
        admission=admission,
    )
    validate(trace, requests, max_len, stop_at)
    return trace


def main(argv: list[str] | None = None) -> int:
    """``python -m conveyor.inference.pipeline.schedule_check --stages 2 --prompts 3,9,2``: check one layout and
    print its grid (what each rank sends, receives and runs, in order)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--lanes", type=int, default=1, help="lanes per micro-batch")
    p.add_argument("--prompts", default="3,5,2", help="prompt lengths, comma-separated")
    p.add_argument("--max-new-tokens", type=int, default=3)
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK)
    p.add_argument("--max-len", type=int, default=64, help="KV cache positions")
    args = p.parse_args(argv)
    lengths = [int(n) for n in args.prompts.split(",") if n]
    requests = [Request(f"r{i}", [1] * n, args.max_new_tokens) for i, n in enumerate(lengths)]
    try:
        trace = check_generation(
            args.stages,
            args.micro_batches,
            args.lanes,
            requests,
            prefill_chunk=args.prefill_chunk,
            max_len=args.max_len,
        )
    except ScheduleError as err:
        print(err)
        return 1
    print(trace.format_grid())
    print(f"ok: {len(requests)} requests, {sum(len(e) for e in trace.events)} events")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
