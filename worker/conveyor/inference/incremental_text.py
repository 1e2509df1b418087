"""Text of a growing list of tokens, decoded as each token arrives: serve's streamed pieces
(``IncrementalText``) and the generation loop's stop strings (``StopMatcher``, ``stop_string_ends``).

Decoding the whole output at every token took 117 us at 512 tokens with SmolLM2's tokenizer: at 256
lanes, 30 ms a step, more than the step. So a token decodes a short window, TGI's way: the tokens since
the last piece's start, less the text those had before. The window starts a piece back, so that a
SentencePiece word's leading space, dropped at the start of a decode, is decoded the same way on both
sides. A tokenizer whose decode is not a concatenation of its tokens' text (the cleanup of spaces before
punctuation, or a window that changes earlier text) is decoded whole, or in the last tokens' window.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any


class IncrementalText:
    """Text of a growing list of tokens, in pieces that concatenate to the final text.

    Each token decodes a short window, TGI's way: the new text is that of the tokens since the last
    piece's start, less the text those had before, so a token costs the same at 2,000 tokens as at 10
    (decoding the whole output at every token took 117 us at 512 tokens with SmolLM2's tokenizer, on
    the HTTP thread, for every stream). The window starts a piece back, so that a SentencePiece word's
    leading space, dropped at the start of a decode, is decoded the same way on both sides. A tokenizer
    whose decode is not a concatenation of its tokens' text (the cleanup of spaces before punctuation,
    or a window that changes earlier text) decodes the whole output instead, to keep the pieces equal
    to the final text."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], whole: bool | None = None):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = ""
        self.pending = ""  # decoded, not sent: the start of a multi-byte character or of a stop string
        self.start = self.read = 0  # the window: ids[start:read] is the text the last piece completed
        self.whole = not decodes_by_concatenation(tokenizer) if whole is None else whole
        self.stopped = False

    def _held(self, text: str) -> int:
        """Characters at the end of ``text`` that may be the start of a stop string: its longest prefix that
        ends ``text``, no longer than ``text`` (a client's stop string may be a megabyte long; all its
        prefixes, at every token, held the event loop for seconds). Longest first, and none shorter than
        one already found: a model that repeats what starts a long stop string holds its text back as it
        grows, and trying every prefix of 16 such stop strings took 575 us a token on the event loop."""
        held = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return held

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, token: int) -> str:
        self.ids.append(token)
        if self.whole:
            return self._add_whole()
        before, after = self._decode(self.ids[self.start : self.read]), self._decode(self.ids[self.start :])
        if after.endswith("\ufffd") or after == before:  # part of a character, or no text: wait
            return ""
        if not after.startswith(before):  # the tokenizer revised earlier text
            self.whole = True
            return self._add_whole()
        self.pending += after[len(before) :]
        self.start, self.read = self.read, len(self.ids)
        return self._release(self.pending)

    def _add_whole(self) -> str:
        text = self._decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):  # wait for the rest, or the end
            return ""
        return self._release(text[len(self.sent) :], hold=REVISED_CHARACTERS)

    def _release(self, unsent: str, hold: int = 0) -> str:
        """Sends what of ``unsent`` (the text past what was sent) can no longer change: all but its
        last ``hold`` characters and any start of a stop string. A stop string never starts in text
        already sent, as its start was held back; nothing after it is ever sent."""
        if self.stopped:
            return ""
        for s in self.stops:
            if s in unsent:
                unsent, self.stopped = unsent[: unsent.index(s)], True
        if self.stopped:  # the text before a stop string is final: no token follows it
            hold = 0
        piece = unsent[: max(0, len(unsent) - max(hold, self._held(unsent)))]
        self.pending = unsent[len(piece) :]
        self.sent += piece
        return piece

    def finish(self, final: str) -> str:
        piece = final[len(self.sent) :] if final.startswith(self.sent) else ""
        self.sent += piece
        return piece


def decodes_by_concatenation(tokenizer: Any) -> bool:
    """Whether decoding in windows gives the tokenizer's whole decode, on a text of the patterns that
    tokenizers clean up across tokens (spaces before punctuation, " do not" to " don't": WordPiece's
    decoder, transformers' ``clean_up_tokenization_spaces``). Asked once per tokenizer."""
    try:
        return _CONCATENATES[tokenizer]
    except (KeyError, TypeError):
        pass
    ids = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    text = IncrementalText(tokenizer, (), whole=False)
    windowed = "".join(text.add(t) for t in ids)
    answer = bool(windowed + text.finish(windowed) == tokenizer.decode(ids, skip_special_tokens=True))
    with contextlib.suppress(TypeError):  # an object without weak references is asked each time
        _CONCATENATES[tokenizer] = answer
    return answer


# The characters at the end of a whole decode that a later token's cleanup may still change: the
# patterns are at most 7 characters (" do not"), their first a space already decoded.
REVISED_CHARACTERS = 8
_PROBE = "I do not know , isn ' t it ? he 's here . we 've , they 're ! I 'm a , b . c ; café 🦊 ."
_CONCATENATES: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


class StopMatcher:
    """Whether a lane's text holds one of ``stops``, asked at every token: the new text of a short window
    (as ``IncrementalText`` decodes it), searched with the characters before it that a stop string could
    span. With SmolLM2's tokenizer on English text, 12 us a token at 16 stop strings of 256 characters
    (the most a request may give) and 9 us at one of 7, where decoding the last tokens' window
    (``stop_string_ends``) took 70 and 12.5 us: at 256 lanes, 18 ms a step against 3. A tokenizer that
    does not decode by concatenation (``decodes_by_concatenation``), or a revision of earlier text, is
    asked in the window."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], incremental: bool | None = None):
        self.tokenizer, self.stops = tokenizer, stops
        self.incremental = decodes_by_concatenation(tokenizer) if incremental is None else incremental
        self.keep = max(len(s) for s in stops) - 1  # characters of earlier text a stop string may span
        self.ids: list[int] = []
        self.tail = ""  # the last ``keep`` characters of the settled text
        self.start = self.read = 0  # ids[start:read]: the tokens of the last settled piece

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, token: int) -> bool:
        """Whether the text, ``token`` included, holds a stop string (first true at the token ending it)."""
        self.ids.append(token)
        if not self.incremental:
            return stop_string_ends(self.tokenizer, self.ids, self.stops)
        before, after = self._decode(self.ids[self.start : self.read]), self._decode(self.ids[self.start :])
        if not after.startswith(before):  # the tokenizer revised earlier text
            return stop_string_ends(self.tokenizer, self.ids, self.stops)
        text = self.tail + after[len(before) :]
        if any(s in text for s in self.stops):
            return True
        if not after.endswith("\ufffd"):  # settled (not a character cut): the next window starts here
            self.tail = text[-self.keep :] if self.keep else ""
            self.start, self.read = self.read, len(self.ids)
        return False


def stop_string_ends(tokenizer: Any, output: list[int], stops: tuple[str, ...]) -> bool:
    """Whether the text of ``output`` holds one of ``stops``, asked as each token arrives. A stop string
    first appears with the token that ends it, so only the last tokens are decoded: one per UTF-8 byte
    of the longest stop string (a token is at least one byte), and 8 more for a character cut at the
    window's start. Decoding the whole output at every token took 117 us a sequence at 512 tokens with
    SmolLM2's tokenizer: 30 ms a step at 256 lanes, more than the step; a window of 4 tokens a character
    took 343 us at a 256-character stop string, 4 times the bytes of an ASCII one."""
    # surrogatepass: a client's stop string may hold a lone surrogate (JSON's "\ud800"), which never
    # matches; it must not raise here, in the generation loop
    window = max(len(s.encode(errors="surrogatepass")) for s in stops) + 8
    text = tokenizer.decode(output[-window:], skip_special_tokens=True)
    return any(s in text for s in stops)
