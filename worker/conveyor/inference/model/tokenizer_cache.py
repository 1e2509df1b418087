"""Tokenizers read without transformers on a warm start.

A job's stage-0 ranks and the pre-flight load the model's tokenizer, and ``AutoTokenizer`` imports the
same registry of transformers that ``AutoConfig`` does (config_cache.py): seconds in every start of
every model that has a tokenizer, which is every real one. What transformers runs for a fast tokenizer
is the Rust tokenizer of the ``tokenizers`` package (0.2 s to import), configured by transformers at
load (post-processor, special tokens), plus one optional text clean-up after decoding.

So the first load, through transformers, keeps the Rust tokenizer as transformers configured it
(``to_str()``) in the compile cache, but only after checking on probe texts that it encodes (with and
without special tokens) and decodes (with and without them) exactly as transformers' tokenizer does;
a tokenizer that differs anywhere is marked so, and always loaded through transformers. Later loads
read it back as ``CachedTokenizer``. A chat template needs transformers' own tokenizer (Jinja and
the template's conventions): ``apply_chat_template`` loads it on first use (serve mode does that
before it is ready); whether there is one (``chat_template``) is kept with the rest.

Keyed by the bytes of every tokenizer file in the directory and the transformers and tokenizers
versions.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

from conveyor.inference.progress import keep_json

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Texts a tokenizer must treat as transformers does before it is kept: spaces, punctuation that
# transformers' clean-up rewrites, non-Latin scripts, emoji, digits, control characters, code.
PROBES = (
    "Hello, world! How are you today?",
    "  two leading spaces and a trailing one ",
    "Don't stop: it's what we're doing , isn't it ? Yes . No !",
    "naïve café, Zürich, 北京, Москва, مرحبا, 😀🚀",
    "1234567890 3.14159 -42 1e-9",
    "line one\nline two\ttab\r\nwindows",
    "def f(x):\n    return x ** 2  # square",
    "<b>markup</b> &amp; {json: [1, 2]}",
    "",
)


def _cleaned(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (spaces before punctuation and English contractions)."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


class CachedTokenizer:
    """The calls Conveyor makes on a tokenizer, on the Rust tokenizer transformers configured."""

    def __init__(self, backend: Any, clean_up: bool, model_dir: str, chat_template: Any = None):
        self.backend, self.clean_up, self.model_dir = backend, clean_up, model_dir
        self.chat_template = chat_template  # transformers' own value: None when the model has none
        self._full: Any = None

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        """``{"input_ids": ids}`` for a text, a list of ids each for a list of texts (transformers' form)."""
        # encode_batch, as transformers calls it: it lets other threads run while it works, where encode
        # holds the GIL (seconds for a prompt of megabytes, during which serve mode's HTTP thread stalled)
        encodings = self.backend.encode_batch(
            [text] if isinstance(text, str) else list(text), add_special_tokens=add_special_tokens
        )
        ids = [list(encoding.ids) for encoding in encodings]
        return {"input_ids": ids[0] if isinstance(text, str) else ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _cleaned(text) if self.clean_up else text

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        if self._full is None:
            from transformers import AutoTokenizer

            self._full = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        return self._full.apply_chat_template(*args, **kwargs)


def has_tokenizer(model_dir: str | Path) -> bool:
    return any((Path(model_dir) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))


RECORD_FORMAT = 2  # part of the key: a record written by older code is never read as this one


def cache_key(model_dir: str | Path) -> str:
    digest = hashlib.sha256(f"record {RECORD_FORMAT}\0".encode())
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            digest.update(f"{name}\0{path.stat().st_size}\0".encode())
            digest.update(path.read_bytes())
    for package in ("transformers", "tokenizers"):
        digest.update(f"{package} {version(package)}\0".encode())
    return digest.hexdigest()[:32]


def _same(reference: Any, candidate: CachedTokenizer) -> bool:
    """Whether ``candidate`` encodes and decodes every probe as transformers' ``reference`` does."""
    specials = [t for t in (reference.bos_token_id, reference.eos_token_id) if isinstance(t, int)]
    for text in PROBES:
        for add in (True, False):
            ids = reference(text, add_special_tokens=add)["input_ids"]
            if candidate(text, add_special_tokens=add)["input_ids"] != ids:
                return False
            for sequence in (ids, specials + ids + specials):
                for skip in (True, False):
                    want = reference.decode(sequence, skip_special_tokens=skip)
                    if candidate.decode(sequence, skip_special_tokens=skip) != want:
                        return False
    return True


def _keepable(tokenizer: Any, model_dir: str) -> dict[str, Any] | None:
    """The record that reproduces ``tokenizer`` without transformers, or None if none does."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        return None  # a slow (Python) tokenizer: nothing to keep
    serialized = backend.to_str()
    for clean_up in (False, True):
        if _same(tokenizer, CachedTokenizer(Tokenizer.from_str(serialized), clean_up, model_dir)):
            return {
                "backend": serialized,
                "clean_up": clean_up,
                "chat_template": getattr(tokenizer, "chat_template", None),
            }
    return None


def load_tokenizer(model_dir: str, cache_dir: Path | None = None) -> Any:
    """``model_dir``'s tokenizer (None if it has none): from ``cache_dir/tokenizers`` when an earlier
    load kept it, else through transformers (and kept, when it reproduces transformers exactly)."""
    if not has_tokenizer(model_dir):  # before any import: transformers' tokenizers take seconds
        return None
    path = cache_dir / "tokenizers" / f"{cache_key(model_dir)}.json" if cache_dir is not None else None
    record = None
    if path is not None:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = None  # none yet, or unreadable: loaded through transformers again
    if record is not None and record.get("backend"):
        from tokenizers import Tokenizer

        return CachedTokenizer(
            Tokenizer.from_str(record["backend"]),
            bool(record["clean_up"]),
            model_dir,
            record.get("chat_template"),
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if path is not None and record is None:
        keep_json(path, _keepable(tokenizer, model_dir) or {"backend": None}, "tokenizer")
    return tokenizer
