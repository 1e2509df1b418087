"""Request bodies as the API reads them (openai_requests.parse): JSON types are taken as sent, not
coerced (a string is no number, a boolean no temperature), as OpenAI's API refuses them; each refusal is
a 400 naming the field. The app's answers to bad requests are in test_openai_api.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conveyor.inference.openai_requests import ApiError, ChatBody, CompletionBody, parse

COMPLETION = {"model": "m", "prompt": "hello", "max_tokens": 4}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


def refusal(model: type, body: dict[str, Any]) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse(model, json.dumps(body).encode())
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"max_tokens": "12"}, "max_tokens"),
        ({"max_tokens": 12.0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": True}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"top_p": "1"}, "top_p"),
        ({"top_k": "3"}, "top_k"),
        ({"seed": True}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"n": 1.0}, "n"),
        ({"n": "2"}, "n"),
        ({"model": 5}, "model"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1.0, 2.0]}, "prompt.0"),  # token ids: integers, not numbers
        ({"prompt": [1, True]}, "prompt.1"),
        ({"stop": 5}, "stop"),
        ({"stop": ["\n", 5]}, "stop.1"),
    ],
)
def test_a_field_of_the_wrong_json_type_is_refused_not_coerced(fields: dict[str, Any], param: str) -> None:
    """Pydantic's lax mode took "yes" for true, "12" for 12 and true for temperature 1.0: a client's
    mistake (a form field, a string from an env var) was served as something else it did not ask for."""
    err = refusal(CompletionBody, {**COMPLETION, **fields})
    assert err.param == param, err.message
    assert err.message.startswith(f"{param}: "), err.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": 1, "content": "x"}]}, "messages.1.role"),
        ({"max_completion_tokens": "8"}, "max_completion_tokens"),
        ({"stream": "true"}, "stream"),
    ],
)
def test_a_chat_field_of_the_wrong_json_type_is_refused(fields: dict[str, Any], param: str) -> None:
    assert refusal(ChatBody, {**CHAT, **fields}).param == param


def test_what_openai_accepts_is_still_read() -> None:
    """An integer where a number is asked (temperature 1), stop as one string or a list, null for the
    nullable fields: what OpenAI's API takes."""
    body = parse(
        CompletionBody,
        json.dumps(
            {**COMPLETION, "temperature": 1, "top_p": 1, "stop": "\n", "stream": None, "n": None}
        ).encode(),
    )
    assert (body.temperature, body.top_p, body.stops(), body.stream, body.n) == (1.0, 1.0, ("\n",), False, 1)
    body = parse(CompletionBody, json.dumps({**COMPLETION, "prompt": [1, 2], "stop": ["a", "b"]}).encode())
    assert (body.prompt, body.stops()) == ([1, 2], ("a", "b"))
    chat = parse(ChatBody, json.dumps({**CHAT, "stream": True, "max_completion_tokens": 8}).encode())
    assert (chat.stream, chat.max_completion_tokens) == (True, 8)


def test_stop_strings_are_capped_in_number_and_length() -> None:
    """Every lane looks for each of its stop strings at every token (the generation loop's decode window
    and the stream's held-back text): 100,000 of them were accepted and cost 73 ms a token on the event
    loop, stalling every stream. At most MAX_STOP_STRINGS of at most MAX_STOP_CHARACTERS each, as TGI
    caps their number (vLLM caps neither)."""
    from conveyor.inference.openai_requests import MAX_STOP_CHARACTERS, MAX_STOP_STRINGS

    most = [f"{i:03d}" + "x" * (MAX_STOP_CHARACTERS - 3) for i in range(MAX_STOP_STRINGS)]
    assert parse(CompletionBody, json.dumps({**COMPLETION, "stop": most}).encode()).stops() == tuple(most)
    err = refusal(CompletionBody, {**COMPLETION, "stop": [*most, "one more"]})
    assert err.param == "stop" and f"at most {MAX_STOP_STRINGS}" in err.message, err.message
    err = refusal(CompletionBody, {**COMPLETION, "stop": ["\n"] * 100_000})
    assert err.param == "stop" and "100000" in err.message, err.message
    long = "y" * (MAX_STOP_CHARACTERS + 1)
    err = refusal(ChatBody, {**CHAT, "stop": ["\n", long]})
    assert err.param == "stop" and f"at most {MAX_STOP_CHARACTERS} characters" in err.message, err.message
    assert "stop string 1" in err.message, err.message
    assert refusal(CompletionBody, {**COMPLETION, "stop": long}).param == "stop"


def test_chat_content_may_be_a_list_of_text_parts() -> None:
    """OpenAI's chat API takes a message's content as a string or a list of content parts
    ([{"type": "text", "text": ...}], what SDKs and frameworks send); a list was a 400. Text parts are
    joined with newlines, as vLLM joins them; any other part (an image) is refused, naming it."""
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    chat = parse(ChatBody, json.dumps({**CHAT, "messages": [{"role": "user", "content": parts}]}).encode())
    assert [m.text() for m in chat.messages] == ["first\nsecond"]
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    err = refusal(ChatBody, {**CHAT, "messages": [{"role": "user", "content": [parts[0], image]}]})
    assert err.param == "messages.0.content.1.type", err.message
    assert refusal(
        ChatBody, {**CHAT, "messages": [{"role": "user", "content": [{"type": "text"}]}]}
    ).param == ("messages.0.content.0.text")


@pytest.mark.parametrize(
    ("model", "fields", "param"),
    [
        (CompletionBody, {"logprobs": 5}, "logprobs"),
        (CompletionBody, {"logprobs": 0}, "logprobs"),  # the sampled tokens' own logprobs
        (CompletionBody, {"echo": True}, "echo"),
        (CompletionBody, {"suffix": "}"}, "suffix"),
        (CompletionBody, {"best_of": 3}, "best_of"),
        (CompletionBody, {"logit_bias": {"50256": -100}}, "logit_bias"),
        (CompletionBody, {"presence_penalty": 0.5}, "presence_penalty"),
        (CompletionBody, {"frequency_penalty": -1}, "frequency_penalty"),
        (ChatBody, {"logprobs": True, "top_logprobs": 2}, "logprobs"),
        (ChatBody, {"top_logprobs": 2}, "top_logprobs"),
        (ChatBody, {"response_format": {"type": "json_object"}}, "response_format"),
        (ChatBody, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        (ChatBody, {"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_a_feature_this_endpoint_does_not_serve_is_refused_not_ignored(
    model: type, fields: dict[str, Any], param: str
) -> None:
    """Fields the engine does not implement were ignored: a client that banned a token (logit_bias),
    asked for JSON (response_format), logprobs or its prompt echoed got an answer without them and no
    word why. Their defaults (what clients that write every field send) are still taken."""
    err = refusal(model, {**(COMPLETION if model is CompletionBody else CHAT), **fields})
    assert err.param == param, err.message
    assert "not served" in err.message, err.message


def test_the_defaults_of_unserved_features_are_taken() -> None:
    defaults = {
        "logprobs": None,
        "echo": False,
        "suffix": None,
        "best_of": 1,
        "logit_bias": {},
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "user": "someone",
        "stream_options": {"include_usage": True},
    }
    parse(CompletionBody, json.dumps({**COMPLETION, **defaults}).encode())
    parse(CompletionBody, json.dumps({**COMPLETION, "n": 2, "best_of": 2}).encode())  # best_of n: n choices
    chat_defaults = {
        "logprobs": False,
        "top_logprobs": None,
        "response_format": {"type": "text"},
        "tools": [],
    }
    parse(ChatBody, json.dumps({**CHAT, **chat_defaults, "tool_choice": "none"}).encode())
    parse(ChatBody, json.dumps({**CHAT, "top_logprobs": 0}).encode())  # none of the alternatives
