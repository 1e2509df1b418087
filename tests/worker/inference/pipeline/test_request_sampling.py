"""A request's own sampling parameters (serve mode's temperature, top_p, seed): each request samples with
its own, whatever shares its micro-batch or held its lane before, exactly as a job whose parameters are
that request's; a request without its own samples with the job's."""

from __future__ import annotations

from pathlib import Path

import pytest
from conveyor.inference.pipeline.generate import Request
from conveyor.inference.pipeline.sampling import SamplingParams
from conveyor.testing.reference import one_process_rank
from conveyor.testing.tiny import save_tiny

from tests.worker.inference.generation import output_ids

NEW = 10
PROMPTS = [[5, 9, 11, 30], [7, 8], [40, 41, 42, 43, 44, 45], [12], [3, 4, 5], [60, 61, 62, 63]]
WARM = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=7)
HOT = SamplingParams(temperature=1.5, seed=11)
JOB = SamplingParams(temperature=0.7, seed=3)
OWN = [WARM, None, HOT, None, WARM, HOT]  # None: the job's


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("m") / "llama", tokenizer=False)


def run(model_dir: Path, job: SamplingParams, requests: list[Request], lanes: int, chunk: int = 2048) -> dict:
    model, peers = one_process_rank(model_dir, lanes=lanes, max_len=24)
    return output_ids(model, peers, job, requests, lanes_per_micro_batch=lanes, prefill_chunk=chunk)


@pytest.mark.parametrize("lanes,chunk", [(2, 2048), (4, 2048), (2, 2)])
def test_each_request_samples_as_a_job_of_its_own_parameters_would(
    model_dir: Path, lanes: int, chunk: int
) -> None:
    # two lanes for six requests: lanes are reused, by requests with other parameters than before;
    # chunk 2: prompts prefilled in chunks (the parameters come with the first)
    mixed = run(
        model_dir,
        JOB,
        [Request(i, p, NEW, sampling=s) for i, (p, s) in enumerate(zip(PROMPTS, OWN))],
        lanes,
        chunk,
    )
    for i, (prompt, own) in enumerate(zip(PROMPTS, OWN)):
        alone = run(model_dir, own or JOB, [Request(i, prompt, NEW)], 1)
        assert mixed[i] == alone[i], (i, own)
    assert len({tuple(v) for v in mixed.values()}) == len(PROMPTS)  # not all the same draws


def test_the_same_sampling_key_gives_the_same_tokens_and_another_does_not(model_dir: Path) -> None:
    # a client's seed keys the draws (not the request's id), so a repeated request repeats its text
    prompt = PROMPTS[0]
    requests = [
        Request("a", prompt, NEW, sampling=HOT, sampling_key=("seed", 1)),
        Request("b", prompt, NEW, sampling=HOT, sampling_key=("seed", 1)),
        Request("c", prompt, NEW, sampling=HOT, sampling_key=("seed", 2)),
        Request("d", prompt, NEW),  # greedy job: unaffected by the others in flight
    ]
    got = run(model_dir, SamplingParams(), requests, 4)
    greedy = run(model_dir, SamplingParams(), [Request("d", prompt, NEW)], 1)
    assert got["a"] == got["b"] != got["c"]
    assert got["d"] == greedy["d"]
