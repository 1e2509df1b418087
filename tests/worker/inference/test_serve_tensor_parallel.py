"""A serve job of 2 stages x 2 tensor-parallel ranks (4 processes, CPU, gloo): the requests reach only the
entry rank, and its tensor-parallel peer at stage 0 schedules on the entry rank's answers
(``ReplicatedQueue``). Concurrent requests, more than the lanes, each get HF's greedy text; a client that
hangs up frees its lane on both ranks; the job drains and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conveyor.testing.tiny import save_tiny
from conveyor.utils import free_port

from tests.conftest import conveyor_cmd, subprocess_env
from tests.worker.inference.test_serve import hf_greedy, metric

pytestmark = pytest.mark.integration

JOB = "tp-serve"
PROMPTS = ["hello world", "the quick brown fox", "a pipeline moves", "tensor parallel ranks", "one more"]


def test_a_tensor_parallel_serve_job_answers_like_hf(tmp_path: Path) -> None:
    import transformers as T

    model = save_tiny("llama", tmp_path / "model")  # 4 heads, 2 KV heads: TP 2 divides them
    port = free_port()
    job = {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "PipelineJob",
        "metadata": {"name": JOB},
        "spec": {
            "mode": "serve",
            "device": "cpu",
            "model": {"path": str(model), "dtype": "float32"},
            "parallelism": {"stages": 2, "tensorParallel": 2, "replicas": 1},
            "resources": {"gpus": 0},
            "serve": {"port": port, "maxBatchSize": 4},
        },
    }
    (tmp_path / "serve.yaml").write_text(json.dumps(job))
    log = tmp_path / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            conveyor_cmd("run", str(tmp_path / "serve.yaml")),
            env=subprocess_env(OMP_NUM_THREADS="1"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "not ready in 240 s:\n" + log.read_text()[-4000:]
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        tok = T.AutoTokenizer.from_pretrained(model)
        hf = (tok, T.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval())
        want = {p: hf_greedy(hf, tok(p)["input_ids"], 10) for p in PROMPTS}
        jobs = PROMPTS * 2  # 10 requests, 4 lanes: they wait, join and leave at different steps

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
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-4000:]
