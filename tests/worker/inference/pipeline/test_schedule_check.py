"""The generation loop's schedule, validated without processes: the real Scheduler and StageWorker.follow
over a simulated pipeline (schedule_check.py), for every (stages, micro-batches, lanes) and admission
pattern; and deliberate mistakes, which must be reported at the rank and step where they happen."""

import pytest
import torch
from conveyor.inference.pipeline import generate
from conveyor.inference.pipeline.generate import Admission, Request, Scheduler
from conveyor.inference.pipeline.schedule_check import (
    STOP_TOKEN,
    check_generation,
    expected_output,
    fake_token,
    main,
    run_pipeline,
)
from conveyor.pipe.schedule import ScheduleError


def _requests(lengths, max_new):
    return [
        Request(f"r{i}", [1 + (i + j) % 50 for j in range(n)], m)
        for i, (n, m) in enumerate(zip(lengths, max_new))
    ]


# Each pattern: (requests for `lanes` lanes in all, keyword arguments of check_generation).
def short(lanes):
    """As many prompts as lanes, 1-4 tokens, all admitted in the first turn."""
    return _requests([1 + i % 4 for i in range(lanes)], [3] * lanes), {}


def chunked(lanes):
    """Long prompts in chunks of 2 (prefill, then extends, one a turn) beside short ones."""
    return _requests([7 if i % 2 == 0 else 2 for i in range(lanes + 1)], [3] * (lanes + 1)), {
        "prefill_chunk": 2
    }


def joining(lanes):
    """More prompts than lanes, with different lengths to generate: lanes free up at different steps and
    waiting sequences join the running ones mid-run."""
    n = 2 * lanes + 1
    return _requests([1 + (3 * i) % 5 for i in range(n)], [1 + (5 * i) % 6 for i in range(n)]), {}


def stops(lanes):
    """Stop tokens end sequences early (at their first, second and third step), while others run on."""
    n = lanes + 2
    reqs = _requests([2] * n, [5] * n)
    return reqs, {"stop_at": {r.id: i % 4 for i, r in enumerate(reqs) if i % 4 < 3}}


def crowd(lanes):
    """Three times as many equal prompts as lanes: whole waves retire and are replaced together."""
    return _requests([3] * (3 * lanes), [2] * (3 * lanes)), {}


def cache_full(lanes):
    """Sequences that run into the end of a 12-position cache (finish reason "length" before max_new)."""
    return _requests([9 + i % 2 for i in range(lanes + 1)], [20] * (lanes + 1)), {"max_len": 12}


PATTERNS = [short, chunked, joining, stops, crowd, cache_full]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.__name__)
@pytest.mark.parametrize("lanes", [1, 2, 3])
@pytest.mark.parametrize("micro_batches", [1, 2, 3, 4])
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_schedule_is_valid(stages, micro_batches, lanes, pattern):
    requests, kwargs = pattern(micro_batches * lanes)
    trace = check_generation(stages, micro_batches, lanes, requests, **kwargs)
    # every stage ran every item stage 0 sent (the same sequence of items), and each answered once
    runs = [[str(e) for e in events if e.op == "run"] for events in trace.events]
    assert all(r == runs[0] for r in runs)
    replies = [e for e in trace.events[0] if e.op == "recv" and e.what == "payload"]
    assert len(replies) == (len(runs[0]) if stages > 1 else 0)


@pytest.mark.parametrize("pattern", [joining, stops, chunked], ids=lambda p: p.__name__)
@pytest.mark.parametrize("lanes", [2, 3])
@pytest.mark.parametrize("micro_batches", [1, 2, 3])
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_schedule_is_valid_when_free_lanes_gather(stages, micro_batches, lanes, pattern):
    """The batch job's admission (free lanes gather before prompts join) holds the same contract:
    no deadlock, every send met, every sequence once with its own tokens."""
    requests, kwargs = pattern(micro_batches * lanes)
    check_generation(
        stages, micro_batches, lanes, requests, admission=Admission(min_free=0.6, max_wait=3), **kwargs
    )


def test_prefill_token_budget_splits_joining_prompts(monkeypatch):
    # 3 prompts of 4 tokens join together; a budget of 8 padded tokens an item splits them 2 + 1.
    monkeypatch.setattr(generate, "PREFILL_TOKENS", 8)
    trace = check_generation(2, 1, 3, _requests([4, 4, 4], [3, 3, 3]))
    assert [str(e) for e in trace.events[1] if e.op == "run"][:2] == ["P[2,4]", "P[1,4]"]


def test_joining_prompts_are_grouped_shortest_first_so_items_pad_little(monkeypatch):
    # 8 prompts join in one turn, in this order; a budget of 32 padded tokens an item. In arrival order
    # they made P[3,9] P[3,9] P[2,8]: 70 padded tokens for 44. Shortest first: P[4,3] P[3,9] P[1,9], 48.
    monkeypatch.setattr(generate, "PREFILL_TOKENS", 32)
    requests = _requests([2, 9, 3, 8, 2, 9, 3, 8], [3] * 8)
    trace = check_generation(2, 1, 8, requests)  # (the outputs are still every request's own)
    assert [str(e) for e in trace.events[1] if e.op == "run"][:3] == ["P[4,3]", "P[3,9]", "P[1,9]"]


def test_expected_output_follows_the_fake_model():
    req = Request("a", [5, 6, 7], 4)
    tokens = [fake_token(req.key, k) for k in range(4)]
    assert expected_output(req, 64, None) == (tokens, "length")
    assert expected_output(req, 64, 1) == ([tokens[0], STOP_TOKEN], "stop")
    assert expected_output(req, 5, None) == (tokens[:2], "length")  # 3 + 2 positions fill a cache of 5


def test_stages_that_disagree_on_the_hidden_size_are_named_at_the_receive():
    # stage 2 expects hidden states 9 wide, stage 1 sends 8: the first receive on link 1 -> 2 fails
    with pytest.raises(ScheduleError) as err:
        check_generation(3, 2, 1, _requests([2, 2], [2, 2]), hidden=[8, 8, 9])
    text = str(err.value)
    # rank 2's events: <1 P[1,2] (step 0), then the payload receive (step 1)
    assert "rank 2 step 1: receives <1 h[1,2,9] from rank 1, but rank 1 step 4 sent >2 h[1,2,8]" in text
    assert ">>2 h[1,2,8]" in text and "><1 h[1,2,9]" in text  # both ends marked in the grid


class _WrongReplySize(Scheduler):
    """A scheduler that reads a prefill's reply as if it were a whole micro-batch's."""

    def _reply(self, n):
        return super()._reply(self.b)


def test_a_reply_read_with_the_wrong_shape_is_named():
    with pytest.raises(
        ScheduleError,
        match=r"rank 0 step \d+: receives <2 t\[3\] from rank 2, but rank 2 step \d+ sent >0 t\[1\]",
    ):
        check_generation(3, 1, 3, _requests([2, 5], [2, 2]), prefill_chunk=4, scheduler=_WrongReplySize)


class _NoStop(Scheduler):
    """A scheduler whose stop item never leaves stage 0."""

    def run(self, requests):
        channel = self.worker.channel
        send_meta = channel.send_meta
        channel.send_meta = lambda meta, dst: None if int(meta[0]) == 0 else send_meta(meta, dst)
        super().run(requests)


def test_a_missing_stop_item_is_a_deadlock_marked_on_the_waiting_ranks():
    trace = run_pipeline(3, 2, 1, _requests([2, 2], [2, 2]), scheduler=_NoStop)
    assert trace.deadlock and trace.positions[0] is None
    with pytest.raises(ScheduleError) as err:
        check_generation(3, 2, 1, _requests([2, 2], [2, 2]), scheduler=_NoStop)
    text = str(err.value)
    at = trace.positions[1]
    assert f"rank 1 step {at}: waits for meta from rank 0 that is never sent" in text
    assert "deadlock: ranks [1, 2]" in text
    assert "><0 ?" in text and "><1 ?" in text


class _StaleTokens(Scheduler):
    """A scheduler that forgets to put a prefill's token into ``next_token``: the first decode step of
    every sequence is fed a stale token."""

    def _receive(self, item):
        if item.kind == generate.PREFILL:
            keep = self.next_token.clone()
            super()._receive(item)
            self.next_token.copy_(keep)
        else:
            super()._receive(item)


def test_a_lane_fed_the_wrong_token_fails_at_its_decode_item():
    with pytest.raises(
        ScheduleError, match=r"rank 0 step \d+: failed: .*lane 0 fed token 0 at step 1, not \d+"
    ):
        check_generation(2, 1, 1, _requests([3], [3]), scheduler=_StaleTokens)


class _Twice(Scheduler):
    """A scheduler that reports every result twice."""

    def run(self, requests):
        report = self.hooks.on_result
        self.hooks.on_result = lambda r: (report(r), report(r))
        super().run(requests)


def test_a_result_reported_twice_is_refused():
    with pytest.raises(ScheduleError, match="request 'r0' finished 2 times"):
        check_generation(2, 1, 1, _requests([3], [2]), scheduler=_Twice)


def test_the_fake_pipeline_sends_the_compute_dtype():
    # payloads between stages are float32 hidden states; replies int64 tokens
    trace = check_generation(2, 1, 1, _requests([2], [2]))
    payloads = {(e.op, e.dtype) for e in trace.events[1] if e.what == "payload"}
    assert payloads == {("recv", torch.float32), ("send", torch.int64)}


class _DecodeOnePositionAhead(Scheduler):
    """A scheduler whose decode items write one position past where each lane's cache ends (a hole)."""

    def run(self, requests):
        pack = self.worker.pack

        def shifted(kind, lane_start, positions, *args, **kwargs):
            if kind == generate.DECODE:  # idle lanes stay at the scratch position
                positions = torch.where(positions == self.max_len, positions, positions + 1)
            return pack(kind, lane_start, positions, *args, **kwargs)

        self.worker.pack = shifted
        super().run(requests)


def test_a_decode_that_leaves_a_hole_in_the_cache_is_named():
    # 3 prompt tokens fill positions 0-2: the first decode belongs at 3
    with pytest.raises(
        ScheduleError,
        match=r"rank 0 step 4: failed: AssertionError: lane 0: a decode of 'r0' from position 4, but its "
        r"cache holds 3 positions of 'r0'",
    ):
        check_generation(2, 1, 1, _requests([3], [3]), scheduler=_DecodeOnePositionAhead)


def test_the_command_prints_the_grid_of_a_layout(capsys):
    assert main(["--stages", "2", "--micro-batches", "1", "--lanes", "1", "--prompts", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    # 3 tokens: the prefill samples the first, two decodes the others (the length limit is known ahead:
    # no extra step), then the stop item. Stage 1 runs each item and replies its token to stage 0.
    want = """
       0 |  P[1,2]       <0 P[1,2]
       1 |  >1 P[1,2]    <0 h[1,2,8]
       2 |  >1 h[1,2,8]  P[1,2]
       3 |  <1 t[1]      >0 t[1]
       4 |  D[1,1]       <0 D[1,1]
       5 |  >1 D[1,1]    <0 h[1,1,8]
       6 |  >1 h[1,1,8]  D[1,1]
       7 |  <1 t[1]      >0 t[1]
       8 |  D[1,1]       <0 D[1,1]
       9 |  >1 D[1,1]    <0 h[1,1,8]
      10 |  >1 h[1,1,8]  D[1,1]
      11 |  <1 t[1]      >0 t[1]
      12 |  >1 X         <0 X
    """
    assert [line.split() for line in out[2:-1]] == [line.split() for line in want.strip().splitlines()]
    assert out[-1] == "ok: 1 requests, 26 events"
