"""Serve mode against a hostile client: bodies built to be slow to parse, floods of connections that
send nothing, streams whose client never reads. Each must cost the replica a bounded amount, and
/health must keep answering meanwhile."""

from __future__ import annotations

import contextlib
import gc
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from conveyor.inference.http_connections import MIN_CONNECTIONS, max_connections
from conveyor.inference.openai_api import build_app
from conveyor.inference.openai_requests import MAX_BODY_BYTES, MAX_MESSAGES, ApiError, ChatBody, parse
from conveyor.inference.pipeline.generate import RequestQueue, Result
from conveyor.inference.serve import ServeEngine, start_http
from conveyor.testing.tiny import build_tokenizer
from starlette.testclient import TestClient


def engine_of(tokenizer, lanes: int = 1, max_waiting: int = 2, timeout: float = 10.0) -> ServeEngine:
    """An engine whose queue nobody consumes, unless a test does."""
    engine = ServeEngine(
        "job", "m", tokenizer, 64, 320, lanes=lanes, queue=RequestQueue(max_waiting), timeout=timeout
    )
    engine.set_ready()
    return engine


def chat(messages: list) -> dict:
    return {"model": "m", "messages": messages, "max_tokens": 4}


def test_too_many_messages_or_content_parts_are_refused_naming_the_field() -> None:
    """OpenAI's cap of 2,048 messages; content parts count too. Each message was validated before the
    count was checked: 230,000 of them (8 MiB) took 0.6 s of the event loop."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    http = TestClient(build_app(engine_of(tokenizer)))
    empty = {"role": "user", "content": ""}
    r = http.post("/v1/chat/completions", json=chat([empty] * (MAX_MESSAGES + 1)))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert f"at most {MAX_MESSAGES}" in r.json()["error"]["message"]
    parts = {"role": "user", "content": [{"type": "text", "text": ""}] * MAX_MESSAGES}
    r = http.post("/v1/chat/completions", json=chat([parts, empty]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    r = http.post("/v1/chat/completions", json=chat([{"role": "user", "content": 7}] * 2))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content", r.text


def hostile_bodies() -> list[bytes]:
    """The slowest bodies to read per byte that were found, each as large as the limit allows (8 MiB
    of them held the event loop 0.6-1.5 s each), for a model not served: refused once read."""
    pad = MAX_BODY_BYTES - 64
    head = b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}], "user": '
    return [
        head + b"[" + b"[]," * (pad // 3 - 30) + b"[]]}",  # millions of containers: json.loads and its GC
        json.dumps({**chat([{"role": "user", "content": ""}] * (pad // 34)), "model": "nope"}).encode(),
    ]


def test_a_hostile_body_costs_little_time_to_read() -> None:
    """What reading one holds the event loop, in CPU time of this thread (not wall time, which other
    processes on the machine stretch): 8 MiB bodies took 0.6-1.5 s each. With the heap of the start
    frozen, as the serve rank's is (run_rank), not the collector's scanning of this process's heap."""
    for body in frozen_heap(hostile_bodies()):
        began = time.thread_time()
        with pytest.raises(ApiError):
            parse(ChatBody, body).model == "m" or throw_not_served()
        assert time.thread_time() - began < 0.25


def frozen_heap(items: list[bytes]) -> Iterator[bytes]:
    gc.collect()
    gc.freeze()
    try:
        yield from items
    finally:
        gc.unfreeze()


def throw_not_served() -> None:
    raise ApiError(404, "the hostile bodies name a model not served", "model")


def test_health_answers_while_hostile_bodies_are_read() -> None:
    """/health answers between the reads of bodies of the largest size built to be slow: the body
    limit and the message cap bound what one read holds the event loop (a generous bound of 1 s between
    two answers, for a busy machine: an 8 MiB body held it for 0.6-1.5 s, 6 of them 2.8 s)."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    server = start_http(build_app(engine_of(tokenizer)), 0, host="127.0.0.1")
    url = f"http://127.0.0.1:{server.server.servers[0].sockets[0].getsockname()[1]}"
    statuses: list[int] = []

    def post_all() -> None:
        with httpx.Client(timeout=60) as c:
            for body in frozen_heap(hostile_bodies() * 3):
                statuses.append(c.post(f"{url}/v1/chat/completions", content=body).status_code)

    slowest = 0.0
    try:
        poster = threading.Thread(target=post_all)
        with httpx.Client(timeout=60) as probe:
            assert probe.get(f"{url}/health").status_code == 200  # connected before the bodies come
            poster.start()
            last = time.perf_counter()
            while poster.is_alive():
                assert probe.get(f"{url}/health").status_code == 200
                slowest, last = max(slowest, time.perf_counter() - last), time.perf_counter()
                time.sleep(0.01)
        poster.join()
    finally:
        server.stop()
    assert len(statuses) == 6 and all(s in (400, 404) for s in statuses), statuses
    assert slowest < 1.0, f"/health answered nothing for {slowest:.2f}s while hostile bodies were read"


def test_connections_that_send_no_request_are_closed_and_bounded() -> None:
    """A connection that sent nothing, or part of a head (slowloris), was held for ever (uvicorn times a
    connection out only between requests), and a flood of them spent the file descriptors. They are
    closed after ``head_seconds``; past ``max_open`` the one waiting longest is closed to make room, so
    /health and /metrics are still answered under the flood."""
    import socket

    engine = engine_of(build_tokenizer())
    server = start_http(build_app(engine), 0, host="127.0.0.1", max_open=16, head_seconds=1.0)
    port = server.server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    flood: list[socket.socket] = []
    try:
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never the blank line that ends a head
        began = time.perf_counter()
        assert silent.recv(1) == b"" and slow.recv(1) == b""  # closed by the server
        assert time.perf_counter() - began < 5
        for _ in range(200):
            flood.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        for path in ("/health", "/metrics"):
            assert httpx.get(url + path, timeout=10).status_code == 200
        time.sleep(0.2)  # the evicted ones' closing is done on the server's loop
        assert len(server.server.server_state.connections) <= 16
        closed = 0
        for sock in flood:
            sock.settimeout(0.01)
            with contextlib.suppress(TimeoutError):
                closed += sock.recv(1) == b""
        assert closed >= 200 - 16, closed
        with httpx.Client(timeout=10) as kept:  # a kept-alive connection serves its next requests
            assert [kept.get(url + "/health").status_code for _ in range(3)] == [200] * 3
    finally:
        for sock in flood:
            sock.close()
        server.stop()


def test_the_connection_bound_follows_the_lanes_and_the_descriptor_limit() -> None:
    assert max_connections(3, descriptors=-1) == MIN_CONNECTIONS  # no limit on descriptors
    assert max_connections(1000, descriptors=1 << 20) == 8000  # 8 per admitted request
    assert max_connections(1000, descriptors=4096) == 2048  # half the process's descriptors


def answer_all(engine: ServeEngine, stop: threading.Event) -> threading.Thread:
    """A generation loop without a model: each request gets its max_tokens of "a", one at a time."""
    letter = engine.tokenizer.convert_tokens_to_ids("a")

    def run() -> None:
        while not stop.is_set():
            if (request := engine.queue.poll()) is None:
                engine.queue.wait(0.05)
                continue
            for _ in range(request.max_new_tokens):
                engine.on_token(request, letter)
            out = [letter] * request.max_new_tokens
            engine.on_result(Result(request.id, request.prompt_ids, out, "length", "a" * len(out)))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_stream_whose_client_never_reads_frees_its_lane_and_its_connection() -> None:
    """A client that asks for a stream and never reads it: once the socket's buffers are full, sending
    waited for it for ever, holding the connection and the response (no deadline is checked while a
    send waits). The generation ends at max_tokens regardless (the lane is free for the next request,
    and what waits to be sent is at most max_tokens tokens); the connection is closed once the request's
    timeout (and a grace for the last events) has passed."""
    import socket

    engine = engine_of(build_tokenizer(), timeout=60)
    engine.max_len = 4096  # a long output: more than the socket's buffers hold
    stop = threading.Event()
    answer_all(engine, stop)
    server = start_http(build_app(engine), 0, host="127.0.0.1", send_seconds=1.0)
    listening = server.server.servers[0].sockets[0]
    # small buffers (a connection takes its listener's), which a far client's also are: the kernel lets
    # a loopback connection's grow to megabytes, more than the whole output
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    port = listening.getsockname()[1]
    body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 4000, "stream": True}).encode()
    try:
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", port))
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        stalled.sendall(head.encode() + body)
        time.sleep(0.5)  # its tokens are generated; it reads none of them
        other = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "m", "prompt": "hi", "max_tokens": 3},
            timeout=10,
        )
        assert other.status_code == 200 and other.json()["choices"][0]["text"] == "aaa", other.text
        assert engine._streams == {}  # both results delivered to their streams: no lane held
        connections = server.server.server_state.connections
        deadline = time.monotonic() + 5  # send_seconds, and time to spare
        while connections and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not connections, "the server still holds the connection of a client that reads nothing"
        stalled.settimeout(10)
        received = b""
        while chunk := stalled.recv(1 << 16):  # what was in the buffers, then the server's close
            received += chunk
        stalled.close()
    finally:
        stop.set()
        server.stop()
    assert received.startswith(b"HTTP/1.1 200") and b"[DONE]" not in received


def test_a_uvicorn_without_what_the_bounds_use_serves_with_its_own_protocol(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from conveyor.inference import http_connections
    from uvicorn.protocols.http.h11_impl import H11Protocol

    assert isinstance(http_connections.bounded_h11(16), type)  # this uvicorn has all of USES
    monkeypatch.delattr(H11Protocol, "handle_events")
    assert http_connections.bounded_h11(16) == "h11"


def raw_exchange(port: int, data: bytes, timeout: float = 30) -> bytes:
    """Send ``data`` on a fresh connection; what the server answers until it closes."""
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    with contextlib.suppress(ConnectionError):  # the server may close while the rest is sent
        sock.sendall(data)
    received = b""
    with contextlib.suppress(ConnectionError):
        while chunk := sock.recv(1 << 16):
            received += chunk
    sock.close()
    return received


def test_a_body_in_tiny_chunks_is_refused_before_it_holds_the_event_loop() -> None:
    """h11 parses each chunk of a chunked body on the event loop (5 us each): a 1 MiB body sent in chunks
    of one byte held it 5.6 s of CPU (the same body in 64 KiB chunks: 0.01 s). A body comes in at most
    MAX_BODY_PIECES pieces; past that the request is refused with 413 and the connection closed."""
    from conveyor.inference.http_connections import MAX_BODY_PIECES

    server = start_http(build_app(engine_of(build_tokenizer())), 0, host="127.0.0.1")
    port = server.server.servers[0].sockets[0].getsockname()[1]
    body = b'{"model": "nope", "prompt": "hi", "user": "' + b"a" * (2 * MAX_BODY_PIECES) + b'"}'
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    tiny = b"".join(b"1\r\n" + body[i : i + 1] + b"\r\n" for i in range(len(body))) + b"0\r\n\r\n"
    try:
        answer = raw_exchange(port, head + tiny)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"pieces" in answer and b"too_large" in answer, answer
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        server.stop()


def test_a_body_nobody_reads_is_still_bounded() -> None:
    """/health answers without reading a body; uvicorn then read and dropped whatever followed, for as
    long as the client sent it (its chunks parsed one by one on the event loop). A request's body is
    bounded on the wire, read or not: past it the connection is closed."""
    from conveyor.inference.http_connections import MAX_BODY_PIECES

    server = start_http(build_app(engine_of(build_tokenizer())), 0, host="127.0.0.1")
    port = server.server.servers[0].sockets[0].getsockname()[1]
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    try:
        began = time.perf_counter()
        answer = raw_exchange(port, head + b"1\r\na\r\n" * (2 * MAX_BODY_PIECES), timeout=10)
        assert time.perf_counter() - began < 5, "the connection was held while its body came"
        # answered or refused, as the app's answer or the body's bound came first; or lost to the reset
        assert answer == b"" or answer.startswith((b"HTTP/1.1 200", b"HTTP/1.1 413")), answer[:200]
        assert not server.server.server_state.connections
    finally:
        server.stop()


def test_bodies_that_arrive_together_are_parsed_in_turns() -> None:
    """Bodies that finished arriving together were parsed back to back in one turn of the event loop:
    /health waited for all of them (32 bodies of the largest size: 1.5 s, 6.7 s on a busy machine; now
    0.65 s there). One is parsed a turn, so /health is answered between two: its longest wait is a small
    part of the time all of them take (a ratio, as this machine's speed varies)."""
    import socket

    tokenizer = build_tokenizer()
    server = start_http(build_app(engine_of(tokenizer)), 0, host="127.0.0.1")
    port = server.server.servers[0].sockets[0].getsockname()[1]
    body = hostile_bodies()[0]  # names a model not served: each is refused once parsed
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    uploads = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(10)]
    for sock in uploads:  # all of each body but the chunk that ends it
        sock.sendall(head + b"%x\r\n" % len(body) + body + b"\r\n")
    waits: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=60) as client:
            while not done.is_set():
                began = time.perf_counter()
                assert client.get(f"http://127.0.0.1:{port}/health").status_code == 200
                waits.append(time.perf_counter() - began)

    gc.collect()
    gc.freeze()  # as the serve rank's heap is: what is measured is the parsing, not the collector
    prober = threading.Thread(target=probe)
    try:
        prober.start()
        time.sleep(0.2)
        began = time.perf_counter()
        for sock in uploads:
            sock.sendall(b"0\r\n\r\n")
        answers = [sock.recv(12) for sock in uploads]
        took = time.perf_counter() - began
        done.set()
        prober.join()
    finally:
        gc.unfreeze()
        done.set()
        for sock in uploads:
            sock.close()
        server.stop()
    assert answers == [b"HTTP/1.1 404"] * len(uploads), answers
    assert max(waits) < 0.5 * took, f"/health waited {max(waits):.2f}s of the {took:.2f}s the bodies took"


def test_a_request_with_two_body_lengths_is_refused_and_its_connection_closed() -> None:
    """Content-Length and Transfer-Encoding both: h11 read the body as chunked and kept the connection,
    so a proxy in front that read it by its Content-Length saw another request in what followed (request
    smuggling). RFC 9112 (6.1): the server must close the connection after answering it; it is refused."""
    server = start_http(build_app(engine_of(build_tokenizer())), 0, host="127.0.0.1")
    port = server.server.servers[0].sockets[0].getsockname()[1]
    body = b'{"model": "nope", "prompt": "hi"}'
    both = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(body)
        + body
        + b"\r\n0\r\n\r\n"
    )
    try:
        answer = raw_exchange(port, both + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", timeout=10)
    finally:
        server.stop()
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"Transfer-Encoding" in answer and answer.count(b"HTTP/1.1") == 1, answer


def test_a_repeated_token_held_back_by_long_stop_strings_costs_little_a_token() -> None:
    """A model that repeats what starts a client's long stop strings (16 of 256 characters, the most a
    request may have): the stream holds the text back as it grows, and every prefix of every stop string
    was tried at every token, 575 us a token on the event loop (2.4 s over a 4,096-token answer). In CPU
    time of this thread; the text is what it was."""
    from conveyor.inference.incremental_text import IncrementalText
    from conveyor.inference.openai_requests import MAX_STOP_CHARACTERS, MAX_STOP_STRINGS

    tokenizer = build_tokenizer()
    letter = tokenizer.convert_tokens_to_ids("a")
    stops = tuple("a" * (MAX_STOP_CHARACTERS - 1) + chr(ord("b") + i) for i in range(MAX_STOP_STRINGS))
    text = IncrementalText(tokenizer, stops, whole=False)
    began = time.thread_time()
    sent = "".join(text.add(letter) for _ in range(1000))
    per_token = (time.thread_time() - began) / 1000
    assert sent == "a" * (1000 - (MAX_STOP_CHARACTERS - 1))  # the last 255 may start a stop string
    assert per_token < 150e-6, f"{per_token * 1e6:.0f} us a token"
