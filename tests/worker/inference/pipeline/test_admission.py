"""When waiting prompts take free lanes (generate.Admission): a batch job lets free lanes gather, so its
prompts join in fewer, fuller prompt passes, and no lane stays free longer than the bound; when they
join never changes a sequence's tokens."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from conveyor.inference.pipeline import generate
from conveyor.inference.pipeline.generate import BATCH, IMMEDIATE, Admission, Request
from conveyor.inference.pipeline.sampling import SamplingParams
from conveyor.testing.reference import one_process_rank
from conveyor.testing.tiny import save_tiny

from tests.worker.inference.generation import output_ids


def staggered_requests(n: int = 48) -> list[Request]:
    """Prompts of 3-12 tokens whose sequences end at different steps (1-24 new tokens each), as
    sequences that stop at their EOS do."""
    rng = random.Random(0)
    return [
        Request(i, [rng.randrange(3, 100) for _ in range(rng.randint(3, 12))], rng.randint(1, 24))
        for i in range(n)
    ]


def run(model_dir: Path, admission: Admission, monkeypatch: pytest.MonkeyPatch, lanes: int = 16):  # type: ignore[no-untyped-def]
    """(tokens by request, prompt passes, turns each admitted lane had been free)."""
    passes, waits = [], []
    prefill, admit = generate.Scheduler._prefill, generate.Scheduler._admit

    def counted_prefill(self, joining):  # type: ignore[no-untyped-def]
        passes.append(len(joining))
        return prefill(self, joining)

    def timed_admit(self, index, req):  # type: ignore[no-untyped-def]
        waits.append(self.turn - self.lanes[index].free_since)
        return admit(self, index, req)

    monkeypatch.setattr(generate.Scheduler, "_prefill", counted_prefill)
    monkeypatch.setattr(generate.Scheduler, "_admit", timed_admit)
    model, peers = one_process_rank(model_dir, lanes=lanes, max_len=40)
    got = output_ids(
        model, peers, SamplingParams(), staggered_requests(), lanes_per_micro_batch=lanes, admission=admission
    )
    monkeypatch.undo()
    return got, passes, waits


def test_gathered_admission_prefills_in_fewer_passes_with_the_same_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = save_tiny("llama", tmp_path, tokenizer=False)
    want, at_once, waits = run(model_dir, IMMEDIATE, monkeypatch)
    assert max(waits) == 0  # a free lane takes a waiting prompt in the turn it frees
    gathered = Admission(min_free=0.25, max_wait=6)
    got, passes, waits = run(model_dir, gathered, monkeypatch)
    assert got == want
    assert sum(passes) == sum(at_once) == 48
    # as lanes free one or two a step, IMMEDIATE prefills them one or two at a time
    assert len(passes) < len(at_once) / 2, (passes, at_once)
    assert min(passes[1:]) >= 2 and max(waits) <= 6, (passes, waits)
    assert max(waits) > 0  # (they did wait)
    # the batch job's own policy (2 of 16 lanes, 16 turns at most)
    got, passes, waits = run(model_dir, BATCH, monkeypatch)
    assert got == want and max(waits) <= BATCH.max_wait and len(passes) < len(at_once)


def test_a_micro_batch_with_no_busy_lane_admits_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the policy, lanes with nothing beside them to wait for take prompts at once: the first
    wave, and a micro-batch that emptied."""
    model_dir = save_tiny("llama", tmp_path, tokenizer=False)
    got, passes, waits = run(model_dir, Admission(min_free=1.0, max_wait=1000), monkeypatch)
    want, _, _ = run(model_dir, IMMEDIATE, monkeypatch)
    assert got == want  # (all lanes must free before prompts join: one wave after another)
    assert len(passes) <= 48 // 16 + 3


def test_an_admission_policy_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="min_free"):
        Admission(min_free=1.5)
    with pytest.raises(ValueError, match="max_wait"):
        Admission(max_wait=-1)


def test_the_policy_switch_takes_batch_or_immediate_and_refuses_anything_else() -> None:
    from conveyor.inference.job import admission_from_env
    from conveyor.inference.validate import InputError

    assert admission_from_env({}) is BATCH
    assert admission_from_env({"CONVEYOR_ADMISSION": " Immediate "}) is IMMEDIATE
    assert admission_from_env({"CONVEYOR_ADMISSION": "batch"}) is BATCH
    with pytest.raises(InputError, match="CONVEYOR_ADMISSION='later': use batch .* or immediate"):
        admission_from_env({"CONVEYOR_ADMISSION": "later"})
