"""Text prompts are tokenized a batch at a time (validate.tokenized): the same ids as one call a prompt,
in input order, and a refusal still names the line it is about, wherever that line falls in a batch."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from conveyor.inference import validate
from conveyor.inference.job import read_requests
from conveyor.inference.model.families import load_arch
from conveyor.inference.model.tokenizer_cache import CachedTokenizer, load_tokenizer
from conveyor.inference.validate import InputError, check_input, read_rows, tokenized
from conveyor.testing.tiny import save_tiny

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "naïve",
    "café",
    "北京",
    "😀",
    "1234",
    "don't",
    "stop",
]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("m") / "llama")  # 256 positions


def rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Text prompts of 1-40 words, every fifth one given as ids instead."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i in range(n):
        if i % 5 == 4:
            out.append({"id": i, "input_ids": [rng.randrange(3, 100) for _ in range(rng.randint(1, 30))]})
        else:
            out.append(
                {"id": f"p{i}", "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))}
            )
    return out


def write(path: Path, items: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in items))
    return path


@pytest.mark.parametrize("batch", [4, 256])
@pytest.mark.parametrize("cached", [False, True], ids=["transformers", "cached"])
def test_batches_give_each_prompt_the_ids_of_its_own_call(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int, cached: bool
) -> None:
    monkeypatch.setattr(validate, "TOKENIZE_BATCH", batch)
    cache = tmp_path / "cache"
    load_tokenizer(str(model), cache)  # the first load keeps the Rust tokenizer; the second reads it back
    tokenizer = load_tokenizer(str(model), cache if cached else None)
    assert isinstance(tokenizer, CachedTokenizer) == cached
    items = rows(603)
    path = write(tmp_path / "in.jsonl", items)
    arch = load_arch(model)
    for replica, replicas in ((0, 1), (1, 3)):
        got = read_requests(str(path), replica, replicas, tokenizer, 8, arch)
        mine = [r for i, r in enumerate(items) if i % replicas == replica]
        assert [r.id for r in got] == [r["id"] for r in mine]
        for request, row in zip(got, mine, strict=True):
            want = row["input_ids"] if "input_ids" in row else tokenizer(row["prompt"])["input_ids"]
            assert request.prompt_ids == want


class EmptyFor:
    """A tokenizer whose ids for one text are none (what a refusal of an empty prompt is about)."""

    def __init__(self, empty: str):
        self.empty = empty

    def __call__(self, texts: list[str]) -> dict[str, Any]:
        return {"input_ids": [[] if t == self.empty else [5] * len(t.split()) for t in texts]}


def test_a_refusal_names_its_line_wherever_it_falls_in_a_batch(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(validate, "TOKENIZE_BATCH", 4)
    arch = load_arch(model)
    items: list[Any] = [{"id": i, "prompt": f"prompt {i}"} for i in range(12)]
    items[6] = {"id": 6, "input_ids": [3, 4]}
    path = write(tmp_path / "in.jsonl", items)
    # line 8 (the 3rd of the 2nd batch) tokenizes to nothing
    with pytest.raises(InputError, match=r"in\.jsonl:8: the prompt tokenizes to nothing"):
        list(tokenized(path, read_rows(path, arch), EmptyFor("prompt 7")))
    # no tokenizer: the first text prompt of the batch is named, not the batch's first line (ids)
    ids_first = write(tmp_path / "ids_first.jsonl", [{"id": 0, "input_ids": [3]}, {"id": 1, "prompt": "hi"}])
    with pytest.raises(InputError, match=r'ids_first\.jsonl:2: a text "prompt" needs a tokenizer'):
        list(tokenized(ids_first, read_rows(ids_first, arch), None))


def test_the_pre_flight_names_a_prompt_too_long_in_a_later_batch(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(validate, "TOKENIZE_BATCH", 4)
    tokenizer = load_tokenizer(str(model))
    items: list[Any] = [{"id": i, "prompt": "a few words " * 21} for i in range(11)]  # 252 bytes: tokenized
    items.append({"id": 11, "prompt": "fox " * 300})  # line 12: more tokens than the 256 positions
    path = write(tmp_path / "in.jsonl", items)
    with pytest.raises(InputError, match=r"in\.jsonl:12: prompt 11 has \d+ tokens; the model has 256"):
        check_input(path, load_arch(model), tokenizer)
    assert check_input(write(path, items[:11]), load_arch(model), tokenizer) == 11
