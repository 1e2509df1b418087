"""``init_inference(..., replace_with_kernel_inject=True)`` against the single-process HF model, on CPU
processes with gloo: for llama and gpt2 (and qwen2 at TP 2) our fast decoder, sharded TP 1 and 2 from the
HF module's own tensors, gives HF's logits within tolerance (a full batch and a left-padded one) and
HF's greedy tokens, and the same ``transformers.pipeline`` text; sampling runs, beam search is refused by name; two TP-2 groups in a world of 4 work
side by side. A family without a fast path (bloom) keeps AutoTP's HF-module path and matches too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import conveyor
import pytest
import torch

from tests.worker.autotp.families import build, family_results, prompt

RTOL = 2e-5  # of the largest reference logit: float32 sums in another order
FAST = ["llama", "gpt2", "qwen2"]


def _results(tmp: Path, tp: int, families: list[str], world: int = 0) -> dict[str, dict[str, Any]]:
    return family_results(tmp, "tests.worker.autotp.kernel_main", tp, families, world, timeout=600)


@pytest.fixture(scope="module")
def tp1(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return _results(tmp_path_factory.mktemp("kernel"), 1, ["llama", "gpt2"])


@pytest.fixture(scope="module")
def tp2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return _results(tmp_path_factory.mktemp("kernel"), 2, [*FAST, "bloom"])


def _check(row: dict[str, Any], injected: bool) -> None:
    assert "error" not in row, row["error"]
    assert row["kernel_injected"] is injected, row
    bound = RTOL * max(row["ref_max_abs"], 1.0)
    assert row["max_abs_diff"] <= bound, row
    assert row["padded_max_abs_diff"] <= bound, row
    assert row["tokens_equal"], f"greedy tokens differ: {row['tokens']} vs HF {row['ref_tokens']}"
    assert row["padded_tokens_equal"], f"left-padded greedy tokens differ from HF's: {row}"
    assert row["sampled_shape"] == [2, 7 + 8] and row["sampled_prompt_kept"], row
    assert row["top1_is_greedy"], "do_sample with top_k=1 must give the greedy tokens"
    ref, split = row["pipeline_text"]
    assert split == ref and len(ref) > len("w5 w17 w42 w8"), f"transformers.pipeline text differs: {row}"


@pytest.mark.integration
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tp1_fast_path_matches_hf(family: str, tp1: dict[str, dict[str, Any]]) -> None:
    row = tp1[family]
    _check(row, injected=True)
    assert row["hf_weights_released"], "the HF module's weights should move into the fast decoder"
    assert "num_beams=2" in row["num_beams_refusal"], row["num_beams_refusal"]


@pytest.mark.integration
@pytest.mark.parametrize("family", FAST)
def test_tp2_fast_path_matches_hf(family: str, tp2: dict[str, dict[str, Any]]) -> None:
    _check(tp2[family], injected=True)


@pytest.mark.integration
def test_two_tp_groups_in_a_world_of_4(tmp_path: Path) -> None:
    """Consecutive ranks form the groups; each group's scheduler broadcasts from its own rank 0."""
    _check(_results(tmp_path, 2, ["llama"], world=4)["llama"], injected=True)


@pytest.mark.integration
def test_family_without_fast_path_keeps_autotp(tp2: dict[str, dict[str, Any]]) -> None:
    _check(tp2["bloom"], injected=False)


def test_tp_size_the_heads_do_not_divide_is_refused_before_weights_move() -> None:
    model, _ = build("llama")
    with pytest.raises(
        conveyor.autotp.AutoTPError, match="num_attention_heads 8 is not divisible by tensorParallel 3"
    ):
        conveyor.init_inference(model, tensor_parallel={"tp_size": 3}, replace_with_kernel_inject=True)
    assert not any(p.is_meta for p in model.parameters())


def test_unsupported_generate_option_is_named() -> None:
    model, _ = build("gpt2")
    engine = conveyor.init_inference(model, tensor_parallel=1, replace_with_kernel_inject=True)
    with pytest.raises(conveyor.autotp.AutoTPError, match="no_repeat_ngram_size=3"):
        engine.module.generate(prompt(), max_new_tokens=2, no_repeat_ngram_size=3)
    with pytest.raises(conveyor.autotp.AutoTPError, match="past_key_values"):
        engine.module(prompt(), past_key_values=object())
    with pytest.raises(ValueError, match="max_out_tokens"):
        engine.module.generate(prompt(), max_new_tokens=2000)


def test_family_without_fast_path_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    model, _ = build("bloom")
    ids = prompt()
    with torch.no_grad():
        ref = model(ids).logits
    with caplog.at_level("INFO", logger="conveyor.autotp.engine"):
        engine = conveyor.init_inference(model, tensor_parallel=1, replace_with_kernel_inject=True)
    assert not engine.kernel_injected
    records = [r for r in caplog.records if "kernel inject not available" in r.getMessage()]
    assert records and records[0].model_type == "bloom" and "bloom" in records[0].reason  # type: ignore[attr-defined]
    with torch.no_grad():
        assert torch.equal(engine.module(ids).logits, ref)


@pytest.mark.parametrize("max_positions", [2048, 24])
def test_generate_lengths_are_hfs(max_positions: int) -> None:
    """Without max_new_tokens or max_length, HF's generate (transformers 5) adds 20 tokens, the whole at
    most max_position_embeddings; before, the fast path read max_length=20 as the whole (13 new for a
    prompt of 7). max_new_tokens=None is HF's default too (before: a TypeError in engine.generate), and
    max_new_tokens below 1 is refused as HF refuses it (before: the prompt came back unchanged)."""
    model, _ = build("llama", max_position_embeddings=max_positions, eos_token_id=None)
    ids = prompt()
    calls: list[dict[str, Any]] = [{}, {"max_new_tokens": None}, {"max_length": 12}, {"max_new_tokens": 3}]
    with torch.no_grad():
        want = [model.generate(ids, do_sample=False, pad_token_id=0, **kw) for kw in calls]
    engine = conveyor.init_inference(model, tensor_parallel=1, replace_with_kernel_inject=True)
    for kw, ref in zip(calls, want, strict=True):
        got = engine.generate(ids, do_sample=False, pad_token_id=0, **kw)
        assert got.shape == ref.shape and torch.equal(got, ref), kw
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"`max_new_tokens` must be greater than 0, but is {bad}"):
            engine.module.generate(ids, max_new_tokens=bad)


def test_a_model_already_passed_is_refused() -> None:
    """Kernel inject releases the HF weights as it builds: a second call on that model named the meta
    device and asked for checkpoint=; now it says what happened."""
    model, _ = build("llama")
    conveyor.init_inference(model, tensor_parallel=1, replace_with_kernel_inject=True)
    with pytest.raises(conveyor.autotp.AutoTPError, match="already passed to init_inference"):
        conveyor.init_inference(model, tensor_parallel=1, replace_with_kernel_inject=True)
