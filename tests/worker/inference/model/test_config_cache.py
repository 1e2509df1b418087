"""The resolved-config cache: what a warm start reads instead of importing the family's config class."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conveyor.inference.model import config_cache
from conveyor.inference.model.families import arch_from_config, load_arch
from conveyor.inference.model.stage_model import rope_inv_freq
from conveyor.testing.tiny import FAMILIES, hf_config
from transformers import AutoConfig

ROOT = Path(__file__).resolve().parents[4]
VARIANTS = [(family, {}) for family in (*FAMILIES, "bert")] + [
    ("llama", {"tie_word_embeddings": True, "eos_token_id": [2, 3]}),
    (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 32}),
    ("gpt_neox", {"rotary_pct": 0.5}),
    ("opt", {"do_layer_norm_before": False}),
]


def write_config(directory: Path, family: str, overrides: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    hf_config(family, **overrides).save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def fresh_process_memo(monkeypatch):
    monkeypatch.setattr(config_cache, "_resolved", {})


@pytest.mark.parametrize(("family", "overrides"), VARIANTS, ids=lambda v: v if isinstance(v, str) else None)
def test_a_cached_config_describes_the_same_model(tmp_path, family, overrides):
    model = write_config(tmp_path / "model", family, overrides)
    cache = tmp_path / "cache"
    expected = arch_from_config(AutoConfig.from_pretrained(model))
    assert load_arch(model, cache) == expected  # resolved by HF, then kept
    assert len(list((cache / "configs").glob("*.json"))) == 1
    config_cache._resolved.clear()  # as a new process: read back from the file
    cached = load_arch(model, cache)
    assert isinstance(cached.hf_config, config_cache.ResolvedConfig)  # no class of transformers needed
    assert cached == expected
    if expected.rotary_dim:
        (got, got_scale), (want, want_scale) = rope_inv_freq(cached), rope_inv_freq(expected)
        assert torch.equal(got, want) and got_scale == want_scale


def test_a_changed_config_is_resolved_again(tmp_path):
    model = write_config(tmp_path / "model", "llama", {})
    cache = tmp_path / "cache"
    layers = load_arch(model, cache).layers
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers + 1}))
    config_cache._resolved.clear()
    assert load_arch(model, cache).layers == layers + 1
    assert len(list((cache / "configs").glob("*.json"))) == 2


def test_an_unreadable_cache_file_is_resolved_again(tmp_path):
    model = write_config(tmp_path / "model", "gpt2", {})
    cache = tmp_path / "cache"
    expected = load_arch(model, cache)
    (kept,) = (cache / "configs").glob("*.json")
    kept.write_text('{"config": {"model_type"')  # a torn write
    config_cache._resolved.clear()
    assert load_arch(model, cache) == expected
    assert json.loads(kept.read_text())["config"]["model_type"] == "gpt2"  # and written again


def test_a_warm_process_never_imports_transformers(tmp_path):
    model = write_config(tmp_path / "model", "llama", {})
    cache = tmp_path / "cache"
    probe = (
        "import sys; from pathlib import Path; from conveyor.inference.model.families import load_arch; "
        f"arch = load_arch(Path({str(model)!r}), Path({str(cache)!r})); "
        f"from conveyor.inference.job import load_tokenizer; assert load_tokenizer({str(model)!r}) is None; "
        "print(arch.layers, 'transformers.models.llama.configuration_llama' in sys.modules, "
        "'transformers' in sys.modules)"
    )

    def run() -> str:
        env = {"PYTHONPATH": f"{ROOT / 'worker'}:{ROOT}", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
        return subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
        ).stdout.split()

    layers = str(load_arch(model).layers)
    assert run() == [layers, "True", "True"]  # cold: HF resolves it
    assert run() == [layers, "False", "False"]  # warm: from the cache alone
