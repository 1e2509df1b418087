"""Stage 0's scheduler fed while it runs (serve mode): requests that arrive at any time give the tokens
they give in a batch, tokens stream one by one, a cancelled request frees its lane, a full queue refuses,
and the loop waits (does not end) while the queue is empty and open."""

from __future__ import annotations

import threading

import pytest
import torch
from conveyor.inference.pipeline.generate import Request, RequestQueue, Result, SchedulerHooks, run_generation
from conveyor.inference.pipeline.sampling import SamplingParams
from conveyor.testing.reference import one_process_rank
from conveyor.testing.tiny import save_tiny

from tests.worker.inference.generation import output_ids

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33], [40] * 5, [50, 60]]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def rank(tmp_path_factory: pytest.TempPathFactory):
    d = save_tiny("llama", tmp_path_factory.mktemp("m"), tokenizer=False)
    return one_process_rank(d, lanes=2, max_len=64)


class Served:
    """run_generation on a RequestQueue in a thread; results and streamed tokens by request id."""

    def __init__(self, rank, micro_batches: int = 2, max_waiting: int = 16):
        self.queue = RequestQueue(max_waiting)
        self.results: dict[object, Result] = {}
        self.tokens: dict[object, list[int]] = {}
        self.first_token = threading.Event()
        model, peers = rank

        def on_token(req: Request, token: int) -> None:
            self.tokens.setdefault(req.id, []).append(token)
            self.first_token.set()

        hooks = SchedulerHooks(on_result=lambda r: self.results.__setitem__(r.id, r), on_token=on_token)
        self.thread = threading.Thread(
            target=run_generation,
            args=(model, peers, SamplingParams(), self.queue),
            kwargs=dict(
                micro_batches=micro_batches,
                lanes_per_micro_batch=2 // micro_batches,
                device=torch.device("cpu"),
                hooks=hooks,
            ),
            daemon=True,
        )
        self.thread.start()

    def close(self) -> None:
        self.queue.close()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


def test_requests_arriving_while_it_runs_get_their_batch_tokens(rank) -> None:
    model, peers = rank
    batch = [Request(i, p, NEW_TOKENS) for i, p in enumerate(PROMPTS)]
    want = output_ids(model, peers, SamplingParams(), batch, lanes_per_micro_batch=2)
    served = Served(rank)
    served.queue.put(Request(0, PROMPTS[0], NEW_TOKENS))
    assert served.first_token.wait(30)  # it runs; the others join while the first decodes
    for i, p in enumerate(PROMPTS[1:], start=1):
        served.queue.put(Request(i, p, NEW_TOKENS))
    deadline = threading.Event()
    while len(served.results) < len(PROMPTS) and not deadline.wait(0.05):
        pass
    assert served.thread.is_alive()  # all done, the queue empty but open: it waits for more
    served.queue.put(Request("late", PROMPTS[1], NEW_TOKENS))
    served.close()  # closing ends the run once what was admitted has finished
    assert {i: served.results[i].output_ids for i in range(len(PROMPTS))} == want
    assert served.results["late"].output_ids == want[1]
    assert all(served.tokens[i] == served.results[i].output_ids for i in served.results)


def test_a_cancelled_request_frees_its_lane_and_a_waiting_one_is_dropped(rank) -> None:
    model, peers = rank
    want = output_ids(
        model, peers, SamplingParams(), [Request(0, PROMPTS[1], NEW_TOKENS)], lanes_per_micro_batch=1
    )
    served = Served(rank, micro_batches=1, max_waiting=2)
    served.queue.put(Request("long-a", PROMPTS[0], 50))
    served.queue.put(Request("long-b", PROMPTS[2], 50))  # both lanes busy
    assert served.first_token.wait(30)
    served.queue.put(Request("waiting", PROMPTS[3], 50))
    served.queue.put(Request("after", PROMPTS[1], NEW_TOKENS))
    with pytest.raises(RequestQueue.QueueFull):
        served.queue.put(Request("refused", PROMPTS[4], NEW_TOKENS))
    served.queue.cancel("waiting")  # never admitted: simply dropped
    served.queue.cancel("long-a")  # in a lane: freed at its next turn, so "after" gets in
    served.queue.cancel("long-b")
    served.close()
    assert served.results["long-a"].finish_reason == "cancelled"
    assert served.results["long-b"].finish_reason == "cancelled"
    assert len(served.results["long-a"].output_ids) < 50
    assert "waiting" not in served.results and "refused" not in served.results
    assert served.results["after"].output_ids == want[0]
    assert served.results["after"].finish_reason == "length"


def test_an_empty_open_queue_blocks_and_close_ends_the_run(rank) -> None:
    served = Served(rank)
    assert not served.queue.wait(0.01)  # a timeout: nothing arrived
    served.thread.join(timeout=0.3)
    assert served.thread.is_alive()
    served.close()
    assert served.results == {}
