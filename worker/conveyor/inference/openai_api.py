"""The OpenAI-compatible HTTP API of a serve replica (Starlette, run by uvicorn on the entry rank).

``/v1/completions``, ``/v1/chat/completions`` (the tokenizer's chat template), both streamed as
server-sent events when asked; ``/v1/models`` and ``/v1/models/{model}``; ``/health`` (the process is
alive), ``/ready`` (every rank of the group loaded and warmed up), ``/metrics`` (Prometheus). A bad request gets 400 naming the
field (openai_requests.py reads the body; 404 for an unknown model, 413 for a body too large, 408 for
one too slow); a full queue 429; before ready, or once the replica is stopping, 503; a request past its
timeout 504. The app only talks to an ``Engine`` (serve.py): submit token ids, read a
stream of tokens and one result, cancel. ``n`` choices are n sequences of the same prompt, each in its own
lane (their draws keyed by the seed and the choice's index: choice 0 is what the same request with n = 1
gets), merged into one response.

Streamed text is decoded incrementally (``IncrementalText``): a piece is sent once it can no longer
change (not the start of a multi-byte character, not possibly the start of a stop string), and the last
piece completes the final text, so the pieces concatenate to exactly the text a non-streamed request gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from conveyor.inference.incremental_text import IncrementalText
from conveyor.inference.openai_requests import (
    BODY_SECONDS,
    MAX_BODY_BYTES,
    ApiError,
    ChatBody,
    CompletionBody,
    GenerationBody,
    parse,
    read_body,
    utf8_text,
)
from conveyor.inference.pipeline.requests import RequestQueue, Result
from conveyor.inference.pipeline.sampling import SamplingParams


# -- the engine the app talks to -----------------------------------------------------------------
class Stream(Protocol):
    request_id: str
    prompt_ids: list[int]

    async def next(self) -> int | Result: ...


class Engine(Protocol):
    model_name: str
    max_len: int  # KV positions of a sequence: prompt + new tokens
    vocab_size: int  # the model's vocabulary (rows of its embedding): a prompt's token ids are below it
    lanes: int  # sequences generated at once: a request's n choices at most
    tokenizer: Any
    timeout: float  # seconds a request may take

    def ready(self) -> bool: ...
    def submit(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        stop: tuple[str, ...],
        sampling: SamplingParams | None = None,
        seed: int | None = None,  # the client's: keys the draws, so the same seed repeats a text
        choice: int = 0,  # which of the request's n choices (its draws differ from the others')
    ) -> Stream: ...
    def cancel(self, stream: Stream) -> None: ...
    def has_room(self, requests: int) -> bool: ...  # whether the queue takes that many more now
    def metrics(self) -> tuple[bytes, str]: ...  # body, content type
    def count(self, status: int) -> None: ...


# -- the app ------------------------------------------------------------------------------------
# Retry-After of a refusal a retry may pass, which the openai SDK and proxies wait for (without it the SDK
# retried after 0.5 s, then 1 s, 2 s): a full queue frees as its requests finish, within seconds; a replica
# loading or stopping turns ready, or is left by the load balancer, within seconds to minutes.
RETRY_FULL_SECONDS = 1
RETRY_UNAVAILABLE_SECONDS = 5


def queue_full() -> ApiError:
    return ApiError(
        429, "too many requests waiting; retry later", kind="rate_limit_error", retry_after=RETRY_FULL_SECONDS
    )


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def _disconnected(http: HttpRequest) -> None:
    """Returns when the client goes away (after the body is read, receive() waits for that)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def prompt_ids(engine: Engine, body: Any, chat: bool) -> list[int]:
    """The token ids of a request's prompt (its text tokenized, its messages through the chat template,
    or its ids, checked against the model's vocabulary)."""
    if chat:
        if getattr(engine.tokenizer, "chat_template", None) is None:
            raise ApiError(
                400, "this model's tokenizer has no chat template; use /v1/completions", "messages"
            )
        messages = [
            {"role": m.role, "content": utf8_text(m.text(), f"messages.{i}.content")}
            for i, m in enumerate(body.messages)
        ]
        from jinja2 import TemplateError  # transformers renders chat templates with it

        try:
            text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as err:  # its raise_exception, or a field it reads that a message lacks
            raise ApiError(
                400, f"messages: the model's chat template refused them: {err}", "messages"
            ) from None
        ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    elif isinstance(body.prompt, str):
        ids = engine.tokenizer(utf8_text(body.prompt, "prompt"))["input_ids"]
    else:
        ids = body.prompt
        # the model's vocabulary, as the batch job checks (validate.py): an id past the embedding
        # would stop the generation loop, and the tokenizer may have fewer or more ids than it
        if any(not 0 <= t < engine.vocab_size for t in ids):
            raise ApiError(400, f"token ids must be in [0, {engine.vocab_size})", "prompt")
    return list(ids)


def build_app(
    engine: Engine, body_seconds: float = BODY_SECONDS, body_bytes: int = MAX_BODY_BYTES
) -> Starlette:
    """``body_seconds``: how long a request's body may take to arrive; ``body_bytes``: its largest size."""
    # A body is parsed on the event loop, holding the GIL (up to 0.05 s for 1 MiB). Bodies that finish
    # arriving together were parsed back to back in one turn of the loop, with nothing else between: 32
    # of them kept /health (and every stream) waiting 1.5 s. One a turn, the loop's other work (a probe,
    # the tokens of the streams) runs between two of them.
    parsing = asyncio.Lock()

    async def prepare(http: HttpRequest, chat: bool) -> tuple[GenerationBody, list[int], int]:
        if not engine.ready():
            # still loading, or stopping (SIGTERM turns /ready off first): the app cannot tell which
            message = "this replica is loading or stopping; retry when /ready answers 200, or on another"
            raise ApiError(503, message, kind="unavailable", retry_after=RETRY_UNAVAILABLE_SECONDS)
        raw = await read_body(http, body_bytes, body_seconds)
        async with parsing:
            body: Any = parse(ChatBody if chat else CompletionBody, raw)
            await asyncio.sleep(0)  # held over a turn of the loop: the next body is parsed in the next one
        if body.model != engine.model_name:
            raise ApiError(
                404,
                f"model {body.model!r} is not served here; this endpoint serves {engine.model_name!r}",
                "model",
            )
        body.sampling()  # refuses what cannot be served before the prompt is tokenized
        if body.n > engine.lanes:
            raise ApiError(
                400, f"n: at most {engine.lanes} choices (the sequences this replica generates at once)", "n"
            )
        if not engine.has_room(body.n):  # refused now, not after a megabyte of prompt is tokenized (0.5 s)
            raise queue_full()
        where = "messages" if chat else "prompt"
        # in a thread: a prompt of megabytes takes seconds to tokenize, which on the event loop held every
        # stream and /health (the liveness probe); the tokenizer lets other threads run meanwhile
        ids = await asyncio.to_thread(prompt_ids, engine, body, chat)
        if not ids:
            raise ApiError(400, "the prompt is empty once tokenized", where)
        if len(ids) >= engine.max_len:
            raise ApiError(
                400,
                f"the prompt is {len(ids)} tokens; the context is {engine.max_len} (leave room for one)",
                where,
            )
        limit = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
        field = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"
        if limit is None:
            limit = engine.max_len - len(ids)
        elif len(ids) + limit > engine.max_len:
            raise ApiError(
                400,
                f"{field} {limit} + the prompt's {len(ids)} tokens exceed the context of {engine.max_len} tokens",
                field,
            )
        return body, ids, limit

    async def generate(http: HttpRequest, chat: bool) -> Response:
        try:
            body, ids, limit = await prepare(http, chat)
            streams: list[Stream] = []
            try:
                for choice in range(body.n):
                    streams.append(
                        engine.submit(ids, limit, body.stops(), body.sampling(), body.seed, choice)
                    )
            except RequestQueue.QueueFull:
                for stream in streams:  # all n choices or none
                    engine.cancel(stream)
                raise queue_full() from None
            except RequestQueue.Closed:  # SIGTERM came while this request was read: not taken, not lost
                for stream in streams:
                    engine.cancel(stream)
                raise ApiError(
                    503,
                    "this replica is stopping; retry (another replica serves it)",
                    kind="unavailable",
                    retry_after=RETRY_UNAVAILABLE_SECONDS,
                ) from None
        except ApiError as err:
            engine.count(err.status)
            return err.response()
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{streams[0].request_id}", int(time.time())
        head = {"id": rid, "created": created, "model": engine.model_name}
        if body.stream:
            engine.count(200)
            texts = [IncrementalText(engine.tokenizer, body.stops()) for _ in streams]
            return StreamingResponse(
                _events(engine, streams, texts, head, chat), media_type="text/event-stream"
            )
        return await _complete(http, engine, streams, head, chat)

    async def completions(http: HttpRequest) -> Response:
        return await generate(http, chat=False)

    async def chat_completions(http: HttpRequest) -> Response:
        return await generate(http, chat=True)

    card = {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "conveyor"}

    async def models(_: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [card]})

    async def model(http: HttpRequest) -> Response:  # OpenAI's retrieve, the SDK's models.retrieve
        name = http.path_params["name"]
        if name != engine.model_name:
            message = f"model {name!r} is not served here; this endpoint serves {engine.model_name!r}"
            return ApiError(404, message, "model").response()
        return JSONResponse(card)

    async def health(_: HttpRequest) -> Response:
        return PlainTextResponse("ok\n")

    async def ready(_: HttpRequest) -> Response:
        ok = engine.ready()
        return PlainTextResponse("ready\n" if ok else "not ready\n", status_code=200 if ok else 503)

    async def metrics(_: HttpRequest) -> Response:
        body, content_type = engine.metrics()
        return Response(body, media_type=content_type)

    async def not_here(http: HttpRequest, err: Exception) -> Response:
        # An unknown path or method gets an OpenAI-style error, as every other refusal: clients read
        # error.message from a JSON body (Starlette's own answer is plain text)
        status = getattr(err, "status_code", 404)
        what = "no such endpoint" if status == 404 else f"{http.method} is not allowed here"
        return ApiError(
            status, f"{what}: {http.method} {http.url.path}", kind="invalid_request_error"
        ).response()

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models),
            Route("/v1/models/{name:path}", model),  # path: a model name may hold a slash (org/name)
            Route("/health", health),
            Route("/ready", ready),
            Route("/metrics", metrics),
        ],
        exception_handlers={404: not_here, 405: not_here},
    )


def _choice(
    chat: bool, text: str | None, finish: str | None, delta: bool, first: bool = False, index: int = 0
) -> dict[str, Any]:
    if not chat:
        return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
    if not delta:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
        }
    content: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
    if text:
        content["content"] = text
    return {"index": index, "delta": content, "finish_reason": finish}


def _total_usage(results: list[Result]) -> dict[str, int]:
    """The prompt once, the completions of every choice (OpenAI's count for n > 1)."""
    return _usage(len(results[0].prompt_ids), sum(len(r.output_ids) for r in results))


async def _merged(
    streams: list[Stream], deadline: float | None = None
) -> AsyncGenerator[tuple[int, int | Result], None]:
    """(choice, token or result) from every stream as they come, until each has given its result;
    raises TimeoutError at ``deadline`` (time.monotonic), if given."""
    pending = {asyncio.ensure_future(s.next()): i for i, s in enumerate(streams)}
    try:
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise TimeoutError
            for future in sorted(done, key=lambda f: pending[f]):
                i = pending.pop(future)
                item = future.result()
                if not isinstance(item, Result):
                    pending[asyncio.ensure_future(streams[i].next())] = i
                yield i, item
    finally:
        for future in pending:  # a cancelled get takes nothing from its queue
            future.cancel()


async def _complete(
    http: HttpRequest, engine: Engine, streams: list[Stream], head: dict[str, Any], chat: bool
) -> Response:
    """A non-streamed request: wait for every choice's result, the client's leaving or the timeout."""

    async def results() -> list[Result]:
        out: list[Result | None] = [None] * len(streams)
        async with contextlib.aclosing(_merged(streams)) as items:
            async for i, item in items:
                if isinstance(item, Result):  # a token: only the final text is sent
                    out[i] = item
        return [r for r in out if r is not None]

    done, gone = asyncio.ensure_future(results()), asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({done, gone}, timeout=engine.timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not done.done():
        done.cancel()
        for stream in streams:
            engine.cancel(stream)
        status = 499 if gone.done() and not gone.cancelled() else 504
        engine.count(status)
        return ApiError(
            status, f"the request did not finish within {engine.timeout:g}s", kind="timeout"
        ).response()
    finished = done.result()
    engine.count(200)
    obj = "chat.completion" if chat else "text_completion"
    choices = [
        _choice(chat, r.text or "", r.finish_reason, delta=False, index=i) for i, r in enumerate(finished)
    ]
    return JSONResponse({**head, "object": obj, "choices": choices, "usage": _total_usage(finished)})


async def _events(
    engine: Engine, streams: list[Stream], texts: list[IncrementalText], head: dict[str, Any], chat: bool
) -> AsyncIterator[bytes]:
    """Server-sent events, one per piece of text of a choice; the last choice to finish carries the
    usage. The client's leaving (this generator cancelled by Starlette) or the timeout cancels the
    request."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    finished: dict[int, Result] = {}
    try:
        if chat:
            for i in range(len(streams)):
                first = _choice(chat, "", None, delta=True, first=True, index=i)
                yield _sse({**head, "object": obj, "choices": [first]})
        try:
            merged = _merged(streams, time.monotonic() + engine.timeout)
            async with contextlib.aclosing(merged) as items:
                async for i, item in items:
                    if isinstance(item, Result):
                        finished[i] = item
                        last = texts[i].finish(item.text or "")
                        choice = _choice(chat, last, item.finish_reason, True, index=i)
                        chunk = {**head, "object": obj, "choices": [choice]}
                        if len(finished) == len(streams):
                            chunk["usage"] = _total_usage([finished[k] for k in sorted(finished)])
                        yield _sse(chunk)
                    elif piece := texts[i].add(item):
                        choice = _choice(chat, piece, None, True, index=i)
                        yield _sse({**head, "object": obj, "choices": [choice]})
        except TimeoutError:
            error = {"message": f"the request did not finish within {engine.timeout:g}s", "type": "timeout"}
            yield _sse({"error": error})
            return
        yield _sse("[DONE]")
    finally:
        for i, stream in enumerate(streams):
            if i not in finished:
                engine.cancel(stream)
