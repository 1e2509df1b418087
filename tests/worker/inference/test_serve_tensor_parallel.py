"""A serve job of 2 stages x 2 tensor-parallel ranks (4 processes, CPU, gloo): the requests reach only the
entry rank, and its tensor-parallel peer at stage 0 schedules on the entry rank's answers
(``ReplicatedQueue``). Concurrent requests, more than the lanes, each get HF's greedy text; a client that
hangs up frees its lane on both ranks; the job drains and exits 0."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conveyor.testing.tiny import save_tiny
from conveyor.utils import free_port

from tests.worker.inference.test_serve import hf_greedy, metric, running_serve_job, serve_job

pytestmark = pytest.mark.integration

JOB = "tp-serve"
PROMPTS = ["hello world", "the quick brown fox", "a pipeline moves", "tensor parallel ranks", "one more"]


def test_a_tensor_parallel_serve_job_answers_like_hf(tmp_path: Path) -> None:
    import transformers as T

    model = save_tiny("llama", tmp_path / "model")  # 4 heads, 2 KV heads: TP 2 divides them
    with running_serve_job(serve_job(JOB, model, free_port(), tensor_parallel=2), tmp_path) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        tok = T.AutoTokenizer.from_pretrained(model)
        hf = (tok, T.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval())
        want = {p: hf_greedy(hf, tok(p)["input_ids"], 10) for p in PROMPTS}
        # 8 requests, 4 lanes: they wait, join and leave at different steps. Not more: all of them can
        # arrive before the scheduler admits any, and the queue holds 2 a lane (past that, 429).
        jobs = PROMPTS + PROMPTS[:3]

        def ask(prompt: str) -> str:
            return client.completions.create(model=JOB, prompt=prompt, max_tokens=10).choices[0].text

        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(ask, jobs))
        assert got == [want[p] for p in jobs]

        body = {"model": JOB, "prompt": PROMPTS[0], "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # it runs; then the client goes away
        deadline = time.monotonic() + 10
        while metric(url, "conveyor_serve_running_sequences") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(url, "conveyor_serve_running_sequences") == 0
        assert ask(PROMPTS[3]) == want[PROMPTS[3]]  # both stage-0 ranks freed the lane alike
