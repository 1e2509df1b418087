"""What a client of the OpenAI-compatible API sends, read and checked before anything is tokenized:
the body (at most ``MAX_BODY_BYTES``), its JSON, and the request models of ``/v1/completions`` and
``/v1/chat/completions``. A refusal is an ``ApiError``, answered as OpenAI answers one: a status and
``{"error": {"message", "type", "param"}}``, the message naming the field.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse

from conveyor.inference.pipeline.sampling import SamplingParams


class ApiError(Exception):
    """``retry_after``: seconds after which a retry may pass (429, 503), sent as Retry-After."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        headers = None if self.retry_after is None else {"Retry-After": str(self.retry_after)}
        return JSONResponse(body, status_code=self.status, headers=headers)


# The largest body read: a prompt of the longest context (serve.MAX_POSITIONS, 4,096 tokens) is well under
# it as text or ids (256 bytes a token). The JSON is parsed and validated on the event loop, holding the GIL
# (a thread would not free the loop): 8 MiB of small arrays or of chat messages held every stream and
# /health 0.6-1.5 s; 1 MiB holds it under 0.1 s. OpenAI's own limit is larger, and vLLM sets none.
MAX_BODY_BYTES = 1 << 20
# The longest a body may take to arrive: 1 MiB at 35 kB/s. Without a limit, a client that sent part of
# its body and then nothing (slowloris) held a connection and a handler for ever.
BODY_SECONDS = 30.0


async def read_body(http: HttpRequest, limit: int = MAX_BODY_BYTES, seconds: float = BODY_SECONDS) -> bytes:
    """The request's body, refused with 413 once it passes ``limit`` (read no further: Content-Length
    may be absent or wrong), and with 408 if it has not all arrived within ``seconds``."""
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is {int(declared)} bytes; at most {limit} are read", kind="too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(seconds):
            async for chunk in http.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(
                        413, f"the body is over {limit} bytes, the most that is read", kind="too_large"
                    )
                chunks.append(chunk)
    except ClientDisconnect:  # gone mid-upload: nobody reads the answer, but it is counted
        raise ApiError(499, "the client went away while its request was read", kind="client_closed") from None
    except TimeoutError:
        raise ApiError(
            408, f"the body did not arrive within {seconds:g}s ({size} bytes came)", kind="timeout"
        ) from None
    return b"".join(chunks)


# Stop strings of a request: every lane looks for each at every token, in the generation loop (a decode
# window of a token per UTF-8 byte of the longest) and in its stream's held-back text, so their number and
# length bound the work of a token. OpenAI allows 4, TGI 4 by default (--max-stop-sequences); vLLM caps
# neither. A stop string is a marker ("\n\n", "</answer>", "Human:"), not a text.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARACTERS = 256


class ClientJson(BaseModel):
    """A JSON object a client sent. Fields we do not use are ignored (clients send user, metadata, ...),
    unless they would change the answer (``_UNSERVED``). The others are read strictly, as OpenAI's API
    reads them: pydantic's lax mode took "yes" for true, "12" or 12.0 for 12 and true for a temperature
    of 1.0, serving what the client did not ask for. An integer is still a number (temperature 1), as in
    JSON Schema."""

    model_config = ConfigDict(extra="ignore", strict=True)


def _off(value: Any) -> bool:
    return value is None or value is False or value == "" or value == [] or value == {}


# OpenAI's fields that change the answer and that the engine does not implement, each with what leaves it
# off (the default, which clients that write every field send). Ignored, a client that banned a token
# (logit_bias) or asked for JSON got an answer without it and no word why.
_UNSERVED: dict[str, Callable[[Any, dict[str, Any]], bool]] = {
    "logprobs": lambda v, _: _off(v),
    "top_logprobs": lambda v, _: _off(v) or v == 0,
    "echo": lambda v, _: _off(v),
    "suffix": lambda v, _: _off(v),
    "best_of": lambda v, body: v is None or v == 1 or v == body.get("n"),  # best_of n: the n choices
    "logit_bias": lambda v, _: _off(v),
    "presence_penalty": lambda v, _: _off(v) or v == 0,
    "frequency_penalty": lambda v, _: _off(v) or v == 0,
    "response_format": lambda v, _: _off(v) or v == {"type": "text"},
    "tools": lambda v, _: _off(v),
    "functions": lambda v, _: _off(v),
}


class GenerationBody(ClientJson):
    model: str
    stream: bool = False
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    # top_k: not OpenAI's; vLLM's and HF's, which clients send too. It and the seed go to the last stage
    # as int64 (stage.py's _pack_sampling): a larger one raised in the generation loop, ending the replica
    top_k: int | None = Field(None, ge=0, lt=2**63)
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1)  # at most the replica's lanes (checked against the engine)

    @model_validator(mode="before")
    @classmethod
    def _served(cls, body: Any) -> Any:
        for field, off in _UNSERVED.items():
            if isinstance(body, dict) and field in body and not off(body[field], body):
                # the field, in ctx: the error of a model's validator has no loc
                message = "not served by this endpoint (the engine does not implement it); leave it out"
                raise PydanticCustomError("not_served", message, {"field": field})
        return body

    @field_validator("stream", "n", mode="before")
    @classmethod
    def _null_is_the_default(cls, value: Any, info: ValidationInfo) -> Any:
        # OpenAI's schema makes them nullable (null: the default), and clients that write every field send it
        return cls.model_fields[str(info.field_name)].default if value is None else value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings; this request has {len(strings)}")
        for i, s in enumerate(strings):
            # the empty string is in every text: a sequence would stop at its first token, with no text
            # (vLLM refuses it alike)
            if s == "":
                raise ValueError("an empty stop string would end every sequence at its first token")
            if len(s) > MAX_STOP_CHARACTERS:
                which = "the stop string" if isinstance(stop, str) else f"stop string {i}"
                raise ValueError(
                    f"{which} is {len(s)} characters; a stop string has at most {MAX_STOP_CHARACTERS} characters"
                )
        return stop

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling(self) -> SamplingParams | None:
        """This request's own parameters, or None (none given: the job's). A field given alone takes
        OpenAI's defaults for the others (temperature 1, top_p 1); temperature 0 is greedy."""
        if (self.temperature, self.top_p, self.top_k, self.seed) == (None, None, None, None):
            return None
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k or 0,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed or 0,
        )


class CompletionBody(GenerationBody):
    prompt: str | list[int] = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


class TextPart(ClientJson):
    type: Literal["text"]  # an image or audio part is refused: the models served read text
    text: str


class ChatMessage(ClientJson):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart]  # OpenAI's two forms: a string, or content parts

    def text(self) -> str:
        """The content as one string, what chat templates read: text parts joined with newlines, as vLLM
        joins them."""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


# Messages of a chat, content parts included: OpenAI's cap on messages. Counted before any is validated:
# pydantic's max_length is checked after each item is, and 230,000 empty messages took 0.6 s to refuse.
MAX_MESSAGES = 2048


class ChatBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _few_messages(cls, body: Any) -> Any:
        messages = body.get("messages") if isinstance(body, dict) else None
        if isinstance(messages, list):
            parts = sum(
                len(m["content"])
                for m in messages
                if isinstance(m, dict) and isinstance(m.get("content"), list)
            )
            if len(messages) + parts > MAX_MESSAGES:
                message = (
                    f"at most {MAX_MESSAGES} messages and content parts in all; this request has "
                    f"{len(messages)} messages and {parts} content parts"
                )
                raise PydanticCustomError("too_long", message, {"field": "messages"})
        return body


def parse(model: type[BaseModel], raw: bytes) -> Any:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not JSON: {err}") from None
    except RecursionError:  # the parser recurses: arrays or objects nested a few thousand deep
        raise ApiError(400, "the body's JSON is nested too deep to read") from None
    except ValueError as err:  # valid JSON Python does not read: an integer of over 4,300 digits
        raise ApiError(400, f"the body's JSON cannot be read: {err}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        # a union's member name sits in loc (prompt.str): keep the field's own path; a model validator's
        # error has no loc, its field is in ctx
        paths = [
            [p for p in e["loc"] if not _member_name(p)] or [e.get("ctx", {}).get("field", "")]
            for e in err.errors()
        ]
        # the first field's deepest error: that of the union member the value's shape matched (prompt
        # [1.0]: "prompt.0: a valid integer", not "prompt: a valid string")
        errors = [(path, e) for path, e in zip(paths, err.errors(), strict=True) if path[:1] == paths[0][:1]]
        path, first = max(errors, key=lambda item: len(item[0]))
        field = ".".join(str(p) for p in path)
        # our validators' own words, without pydantic's "Value error, " before them
        message = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
        raise ApiError(400, f"{field}: {message}", field) from None


def _member_name(part: Any) -> bool:
    """Whether a part of an error's loc names a union's member (str, list[int], list[TextPart]), not a
    field or an index."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part)


def utf8_text(text: str, field: str) -> str:
    """``text``, if it is text a tokenizer takes: a JSON string may hold a lone surrogate (``"\\ud800"``),
    which is no character, and which the tokenizer refuses with an exception (a 500)."""
    try:
        text.encode()
    except UnicodeEncodeError as err:
        where = f"character {err.start} is a lone surrogate (\\u{ord(text[err.start]):04x})"
        raise ApiError(400, f"{field}: {where}, not a character of any text", field) from None
    return text
