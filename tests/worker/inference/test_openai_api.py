"""The HTTP app without a model: a full queue answers 429, a request past its timeout 504 (and leaves
the queue), 503 before ready and once the replica stops; a stopped server still sends the responses under
way; streamed pieces concatenate to the final text (stop strings, multi-byte characters); n choices,
merged. The whole path, model included, is in test_serve.py."""

from __future__ import annotations

import json
import threading

import pytest
from conveyor.inference.openai_api import IncrementalText, build_app
from conveyor.inference.openai_requests import MAX_BODY_BYTES
from conveyor.inference.pipeline.generate import Request, RequestQueue, Result
from conveyor.inference.serve import ServeEngine, start_http
from conveyor.testing.tiny import build_tokenizer
from starlette.testclient import TestClient

BODY = {"model": "m", "prompt": "hello world", "max_tokens": 4}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def client(tokenizer, max_waiting: int = 1, timeout: float = 5.0, ready: bool = True):
    """An app whose queue nobody consumes."""
    engine = ServeEngine(
        "job",
        "m",
        tokenizer,
        max_len=64,
        vocab_size=320,
        lanes=1,
        queue=RequestQueue(max_waiting),
        timeout=timeout,
    )
    engine.set_ready(ready)
    return engine, TestClient(build_app(engine))


def test_a_full_queue_answers_429_and_a_timeout_504(tokenizer) -> None:
    engine, http = client(tokenizer, max_waiting=2, timeout=0.3)
    engine.queue.put(Request("a", [1, 2], 4))
    r = http.post("/v1/completions", json=BODY)  # waits in the queue, never served
    assert r.status_code == 504 and "0.3s" in r.json()["error"]["message"]
    assert len(engine.queue) == 1  # the timed-out request left the queue
    engine.queue.put(Request("b", [1, 2], 4))
    r = http.post("/v1/completions", json=BODY)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert http.get("/health").status_code == 200
    assert b"conveyor_serve_requests_total" in http.get("/metrics").content


def test_a_body_over_the_limit_is_refused_before_it_is_read_whole(tokenizer) -> None:
    """A body is parsed and tokenized on the event loop: one of hundreds of MiB stalled every stream.
    Past MAX_BODY_BYTES it is a 413, whether it declares its length or comes in chunks without one."""
    engine, http = client(tokenizer)
    padding = " " * MAX_BODY_BYTES  # JSON whitespace: a body that would parse
    r = http.post("/v1/completions", content=json.dumps(BODY)[:-1] + padding + "}")
    assert r.status_code == 413 and r.json()["error"]["type"] == "too_large", r.text

    def chunks():
        yield json.dumps(BODY)[:-1].encode()
        for _ in range(MAX_BODY_BYTES >> 20):
            yield b" " * (1 << 20)
        yield b" }"

    r = http.post("/v1/completions", content=chunks())  # no Content-Length
    assert r.status_code == 413 and "over" in r.json()["error"]["message"], r.text
    assert len(engine.queue) == 0 and http.get("/health").status_code == 200
    short = json.dumps(BODY)[:-1] + " " * (MAX_BODY_BYTES - len(json.dumps(BODY)) - 64) + "}"
    answered = answer_one(engine)
    assert http.post("/v1/completions", content=short).status_code == 200  # just under it: served
    answered.join()


def test_an_unknown_path_or_method_is_an_openai_error(tokenizer) -> None:
    _, http = client(tokenizer)
    r = http.post("/v1/embeddings", json=BODY)
    assert r.status_code == 404 and r.json()["error"]["message"] == "no such endpoint: POST /v1/embeddings"
    r = http.get("/v1/completions")
    assert r.status_code == 405 and "GET is not allowed here" in r.json()["error"]["message"], r.text


def test_not_ready_answers_503(tokenizer) -> None:
    _, http = client(tokenizer, ready=False)
    assert http.get("/ready").status_code == 503
    assert http.post("/v1/completions", json=BODY).status_code == 503
    assert http.get("/health").status_code == 200


def test_a_request_arriving_as_the_replica_stops_answers_503(tokenizer) -> None:
    """SIGTERM closes the queue while a request is being read (still ready when it came in): it is
    refused with 503, which a client retries on another replica, not a 500 or a hang."""
    engine, http = client(tokenizer)
    engine.queue.close()
    r = http.post("/v1/completions", json=BODY)
    assert r.status_code == 503 and "stopping" in r.json()["error"]["message"]
    assert http.get("/health").status_code == 200
    engine.set_ready(False)  # what SIGTERM does first: a request arriving later is told the same
    r = http.post("/v1/completions", json=BODY)
    assert r.status_code == 503 and "stopping" in r.json()["error"]["message"], r.text


# A serve rank's last moments, in a process of its own: a request is admitted, its result comes in, the
# server is stopped, and the process ends (run_rank returns after the generation loop's end; os._exit here,
# which leaves no finalization time in which the daemon server thread might still send).
_STOPPING_RANK = """
import os
from conveyor.inference.pipeline.generate import RequestQueue, Result
from conveyor.inference.openai_api import build_app
from conveyor.inference.serve import ServeEngine, start_http
from conveyor.testing.tiny import build_tokenizer

engine = ServeEngine(
    "job", "m", build_tokenizer(), max_len=64, vocab_size=320, lanes=1, queue=RequestQueue(4), timeout=60
)
engine.set_ready()
server = start_http(build_app(engine), 0, host="127.0.0.1")
print(server.server.servers[0].sockets[0].getsockname()[1], flush=True)
while not engine.queue.wait(60) or len(engine.queue) == 0:
    pass
request = engine.queue.poll()
engine.queue.close()
engine.on_result(Result(request.id, request.prompt_ids, [5, 6], "length", "the answer"))
server.stop()
os._exit(0)
"""


def test_stopping_sends_the_responses_under_way_before_the_process_exits() -> None:
    import subprocess
    import sys

    import httpx

    from tests.conftest import subprocess_env

    proc = subprocess.Popen(
        [sys.executable, "-c", _STOPPING_RANK], env=subprocess_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=BODY, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "the answer"
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({**BODY, "model": "other"}, 404, "model"),
        ({"model": "m"}, 400, "prompt"),
        ({**BODY, "prompt": ""}, 400, "prompt"),
        ({**BODY, "prompt": [1, 99999]}, 400, "prompt"),
        ({**BODY, "max_tokens": 0}, 400, "max_tokens"),
        ({**BODY, "max_tokens": 1000}, 400, "max_tokens"),
        ({**BODY, "temperature": 3}, 400, "temperature"),
        ({**BODY, "top_p": 0}, 400, "top_p"),
        ({**BODY, "top_k": 2**63}, 400, "top_k"),  # past int64: it went on, and its packing stopped the loop
        ({**BODY, "n": 2}, 400, "n"),
        ({**BODY, "stop": ""}, 400, "stop"),  # it is in every text: each sequence stopped at its first token
        ({**BODY, "stop": ["\n", ""]}, 400, "stop"),
    ],
)
def test_bad_requests_name_the_field(tokenizer, body, status, param) -> None:
    _, http = client(tokenizer)
    r = http.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_streamed_pieces_concatenate_to_the_final_text(tokenizer) -> None:
    text = "hello wörld, the quick brown fox STOP and more"
    ids = tokenizer(text)["input_ids"]
    final = tokenizer.decode(ids, skip_special_tokens=True)
    final = final[: final.index(" STOP")]
    stream = IncrementalText(tokenizer, (" STOP",))
    pieces = [stream.add(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == final  # held back: nothing past the stop string was sent
    assert "".join(pieces) + stream.finish(final) == final


def test_a_port_it_cannot_bind_is_an_error(tokenizer) -> None:
    import socket

    engine, _ = client(tokenizer)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="spec.serve.port"):
            start_http(build_app(engine), taken.getsockname()[1], host="127.0.0.1")
    server = start_http(build_app(engine), 0, host="127.0.0.1")  # a free port: listening on return
    server.stop()
    assert not server.thread.is_alive()


class KeyedLoop:
    """A generation loop without a model: each request's tokens follow from its sampling key (as a
    sampled sequence's draws do), one token a step, through the engine's hooks."""

    def __init__(self, engine: ServeEngine):
        self.engine, self.stop = engine, threading.Event()
        self.letters = engine.tokenizer.convert_tokens_to_ids(list("abcdefghijklmnopqrstuvwxyz"))
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        running: list[tuple[Request, list[int]]] = []
        while not self.stop.is_set():
            while len(running) < self.engine.lanes and (req := self.engine.queue.poll()) is not None:
                running.append((req, []))
            for req, out in list(running):
                out.append(self.letters[(req.key + 7 * len(out)) % len(self.letters)])
                self.engine.on_token(req, out[-1])
                if len(out) == req.max_new_tokens:
                    running.remove((req, out))
                    text = self.engine.tokenizer.decode(out, skip_special_tokens=True)
                    self.engine.on_result(Result(req.id, req.prompt_ids, out, "length", text))
            self.stop.wait(0.001)

    def __enter__(self) -> KeyedLoop:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()


def sse_chunks(response) -> list[dict]:
    lines = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_n_choices_are_n_sequences_merged_in_one_response(tokenizer) -> None:
    engine = ServeEngine(
        "job", "m", tokenizer, max_len=64, vocab_size=320, lanes=4, queue=RequestQueue(8), timeout=10
    )
    engine.set_ready()
    http = TestClient(build_app(engine))
    seeded = {**BODY, "temperature": 1.0, "seed": 11, "max_tokens": 6}
    with KeyedLoop(engine):
        one = http.post("/v1/completions", json=seeded).json()
        three = http.post("/v1/completions", json={**seeded, "n": 3}).json()
        again = http.post("/v1/completions", json={**seeded, "n": 3}).json()
        streamed = http.post("/v1/completions", json={**seeded, "n": 3, "stream": True})
        too_many = http.post("/v1/completions", json={**seeded, "n": 5})
    texts = [c["text"] for c in three["choices"]]
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert texts[0] == one["choices"][0]["text"]  # choice 0 draws as the same request with n = 1
    assert len(set(texts)) == 3  # each choice its own draws
    assert [c["text"] for c in again["choices"]] == texts  # the seed repeats all of them
    prompt = len(tokenizer(BODY["prompt"])["input_ids"])
    assert three["usage"] == {"prompt_tokens": prompt, "completion_tokens": 18, "total_tokens": prompt + 18}
    chunks = sse_chunks(streamed)
    pieces = ["", "", ""]
    for chunk in chunks:
        for c in chunk["choices"]:
            pieces[c["index"]] += c["text"]
    assert pieces == texts  # streamed choices concatenate to the non-streamed ones
    assert [c["finish_reason"] for ch in chunks for c in ch["choices"] if c["finish_reason"]] == [
        "length"
    ] * 3
    assert [ch.get("usage") for ch in chunks if ch.get("usage")] == [three["usage"]]  # once, at the end
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"  # 4 lanes
    assert len(engine.queue) == 0


def answer_one(engine: ServeEngine) -> threading.Thread:
    """A generation loop without a model that answers the first request with one token of text "x"."""

    def run() -> None:
        while (request := engine.queue.poll()) is None:
            engine.queue.wait(1.0)
        engine.on_result(Result(request.id, request.prompt_ids, [5], "length", "x"))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_prompt_of_token_ids_is_checked_against_the_models_vocabulary(tokenizer) -> None:
    """Against the model's vocabulary, as the batch job checks them: an id past the embedding would stop
    the loop. Not len() of the tokenizer, which the one a warm start loads (CachedTokenizer) has not:
    every prompt of ids was a 500."""
    from conveyor.inference.model.tokenizer_cache import CachedTokenizer
    from tokenizers import Tokenizer

    cached = CachedTokenizer(Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()), False, "unused")
    engine = ServeEngine(
        "job", "m", cached, max_len=64, vocab_size=300, lanes=1, queue=RequestQueue(2), timeout=10
    )
    engine.set_ready()
    http = TestClient(build_app(engine))
    answered = answer_one(engine)
    r = http.post("/v1/completions", json={**BODY, "prompt": [1, 299]})
    assert r.status_code == 200, r.text
    answered.join()
    assert r.json()["usage"]["prompt_tokens"] == 2
    outside = http.post("/v1/completions", json={**BODY, "prompt": [1, 300]})
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "prompt"
    assert "[0, 300)" in outside.json()["error"]["message"]
    assert len(engine.queue) == 0


def templated(chat_template: str):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = chat_template
    return tokenizer


def test_text_that_cannot_be_tokenized_names_its_field(tokenizer) -> None:
    """A lone surrogate (JSON's "\\ud800") is valid JSON but no UTF-8: the tokenizer refused it with a 500."""
    _, http = client(tokenizer)
    raw = b'{"model": "m", "prompt": "hi \\ud800", "max_tokens": 4}'
    r = http.post("/v1/completions", content=raw)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    _, http = client(templated("{% for m in messages %}{{ m['content'] }}{% endfor %}"))
    messages = b'[{"role": "user", "content": "ok"}, {"role": "user", "content": "\\ud800"}]'
    r = http.post("/v1/chat/completions", content=b'{"model": "m", "messages": ' + messages + b"}")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.1.content", r.text
    assert "\\ud800" in r.json()["error"]["message"]


def test_a_chat_template_that_refuses_the_messages_is_a_bad_request() -> None:
    """Templates raise on what their model was not trained on (Mistral's: roles that do not alternate; many:
    a system message): the client sent it, so 400 with the template's words, not a 500."""
    refusing = templated(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    _, http = client(refusing)
    r = http.post(
        "/v1/chat/completions", json={"model": "m", "messages": [{"role": "system", "content": "x"}]}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages"
    assert "System role not supported" in r.json()["error"]["message"]


def test_null_is_the_default_of_a_nullable_field(tokenizer) -> None:
    """OpenAI's schema makes n and stream nullable (null: the default); a client that writes every field
    sends them so, and got a 400."""
    engine, http = client(tokenizer)
    answered = answer_one(engine)
    r = http.post("/v1/completions", json={**BODY, "n": None, "stream": None, "stop": None, "seed": None})
    assert r.status_code == 200, r.text
    answered.join()
    assert [c["text"] for c in r.json()["choices"]] == ["x"]  # one choice, not streamed


def test_a_client_gone_while_its_body_is_read_is_counted_not_raised(tokenizer) -> None:
    """A client that hangs up mid-upload: 499 (counted, nobody reads it), not an exception out of the app
    (a traceback in the log for every such client)."""
    import asyncio

    engine, _ = client(tokenizer)
    app = build_app(engine)
    events = [
        {"type": "http.request", "body": b'{"model": "m", "pro', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return events.pop(0) if events else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert b'conveyor_serve_requests_total{code="499",job="job"}' in engine.metrics()[0]


@pytest.mark.parametrize(
    "user",
    [b"[" * 5000 + b"]" * 5000, b"1" + b"0" * 5000],
    ids=["nested 5,000 deep", "an integer of 5,001 digits"],
)
def test_valid_json_that_python_does_not_read_is_a_bad_request(tokenizer, user: bytes) -> None:
    """Python's JSON parser recurses, and reads no integer of over 4,300 digits: in any field, even one
    nobody reads, its RecursionError or ValueError left the app (a 500 and a traceback)."""
    _, http = client(tokenizer)
    r = http.post("/v1/completions", content=b'{"model": "m", "prompt": "hi", "user": ' + user + b"}")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("cached", [False, True], ids=["transformers", "cached"])
def test_a_huge_prompt_is_tokenized_off_the_event_loop(tokenizer, cached: bool) -> None:
    """A prompt of megabytes (under the body limit) takes seconds to tokenize: on the event loop, every
    stream and /health (the liveness probe) waited for it. Off the loop, /health answers meanwhile; also
    with the tokenizer a warm start loads (CachedTokenizer), whose encode held the GIL throughout."""
    import time

    import httpx
    from conveyor.inference.model.tokenizer_cache import CachedTokenizer
    from tokenizers import Tokenizer

    if cached:
        tokenizer = CachedTokenizer(Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()), False, "unused")
    engine, _ = client(tokenizer)
    # a body over the limit, to find a prompt slow enough to tokenize on this machine to tell
    server = start_http(build_app(engine, body_bytes=8 << 20), 0, host="127.0.0.1", max_body_bytes=8 << 20)
    url = f"http://127.0.0.1:{server.server.servers[0].sockets[0].getsockname()[1]}"
    huge = {**BODY, "prompt": "the quick brown fox jumps over the lazy dog " * (3 << 20 >> 6)}
    answer: dict[str, object] = {}

    def post() -> None:
        began = time.perf_counter()
        answer["response"] = httpx.post(f"{url}/v1/completions", json=huge, timeout=120)
        answer["seconds"] = time.perf_counter() - began

    # the longest time between two answers of /health while the prompt was read and tokenized: from one
    # answer to the next, not from each request's start, as a tokenizer that holds the GIL stalls this
    # thread too
    slowest = 0.0
    try:
        thread = threading.Thread(target=post)
        thread.start()
        last = time.perf_counter()
        while thread.is_alive():
            assert httpx.get(f"{url}/health", timeout=120).status_code == 200
            slowest, last = max(slowest, time.perf_counter() - last), time.perf_counter()
            time.sleep(0.05)
        thread.join()
    finally:
        server.stop()
    response = answer["response"]
    assert isinstance(response, httpx.Response) and response.status_code == 400, response
    assert response.json()["error"]["param"] == "prompt"  # longer than the context, once tokenized
    assert answer["seconds"] > 1.5, "the prompt tokenized too fast to tell"  # type: ignore[operator]
    assert slowest < 0.5, f"/health answered nothing for {slowest:.2f}s while a prompt was tokenized"


def test_chat_content_parts_render_as_the_same_text() -> None:
    """Content as a list of text parts reaches the chat template as the one string they join to."""
    from conveyor.inference.openai_api import prompt_ids
    from conveyor.inference.openai_requests import ChatBody, parse

    engine, _ = client(templated("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"))
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]
    as_parts = parse(
        ChatBody, json.dumps({"model": "m", "messages": [{"role": "user", "content": parts}]}).encode()
    )
    as_text = parse(ChatBody, b'{"model": "m", "messages": [{"role": "user", "content": "hello\\nworld"}]}')
    assert prompt_ids(engine, as_parts, chat=True) == prompt_ids(engine, as_text, chat=True)


def test_a_body_that_never_finishes_arriving_is_a_408(tokenizer) -> None:
    """A client that sends its headers and part of its body, then nothing (slowloris), held a connection
    and a handler for ever: the body was awaited without a limit. Past ``body_seconds`` it is a 408."""
    import socket
    import time

    engine, _ = client(tokenizer)
    server = start_http(build_app(engine, body_seconds=0.5), 0, host="127.0.0.1")
    port = server.server.servers[0].sockets[0].getsockname()[1]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            slow.sendall(head + b"Content-Length: 1000\r\n\r\n" + b'{"model": "m", ')
            began = time.perf_counter()
            answer = slow.recv(4096)
            waited = time.perf_counter() - began
            while not answer.endswith(b"}") and (more := slow.recv(4096)):  # the JSON body, if apart
                answer += more
    finally:
        server.stop()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"body" in answer and waited < 5, (answer, waited)
    assert b'conveyor_serve_requests_total{code="408",job="job"}' in engine.metrics()[0]


def test_the_model_is_retrieved_by_its_name(tokenizer) -> None:
    """OpenAI's GET /v1/models/{model} (the SDK's models.retrieve): the served model's card, a 404 naming
    the model for any other; it was a 404 "no such endpoint" for every name."""
    _, http = client(tokenizer)
    listed = http.get("/v1/models").json()["data"]
    assert (
        http.get("/v1/models/m").json()
        == listed[0]
        == {
            "id": "m",
            "object": "model",
            "created": 0,
            "owned_by": "conveyor",
        }
    )
    other = http.get("/v1/models/other")
    assert other.status_code == 404 and other.json()["error"]["param"] == "model", other.text


def test_a_refusal_that_a_retry_may_pass_says_when_to_retry(tokenizer) -> None:
    """429 (the queue is full) and 503 (loading, stopping) carry Retry-After, which the openai SDK and
    proxies wait for before they retry (without it, the SDK retried a full queue after 0.5 s, then 1 s);
    a refusal no retry passes (400) has none."""
    engine, http = client(tokenizer, max_waiting=1)
    engine.queue.put(Request("a", [1, 2], 4))
    r = http.post("/v1/completions", json=BODY)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.headers
    engine.set_ready(False)
    r = http.post("/v1/completions", json=BODY)
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.headers
    engine.set_ready(True)
    engine.queue.close()
    engine.queue.poll()
    r = http.post("/v1/completions", json=BODY)
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.headers
    r = http.post("/v1/completions", json={**BODY, "max_tokens": -1})
    assert r.status_code == 400 and "retry-after" not in r.headers


def test_a_full_queue_refuses_before_the_prompt_is_tokenized(tokenizer) -> None:
    """Under a flood the queue is full and every request gets 429; each was tokenized first, so a prompt
    of a megabyte cost 0.3-0.5 s of CPU to be refused. A full queue refuses once the body is read, before
    tokenizing (in CPU time of the process: the tokenizer runs in a thread)."""
    import time

    engine, http = client(tokenizer, max_waiting=1)
    engine.queue.put(Request("a", [1, 2], 4))
    huge = {**BODY, "prompt": "hello world " * (MAX_BODY_BYTES // 12 - 10)}
    began = time.process_time()
    r = http.post("/v1/completions", json=huge)
    assert r.status_code == 429 and r.headers["retry-after"], r.text
    assert time.process_time() - began < 0.15
