"""``conveyor.init_inference`` against the single-process model, on CPU processes with gloo: every family
of ``families.py`` split over TP 2 (and TP 4) gives the same logits (head outputs for encoders) within
tolerance and, for causal and encoder-decoder families, token-identical greedy generation (causal families
also through ``transformers.pipeline`` on ``engine.module``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.worker.autotp.families import FAMILIES, family_results

RTOL = 2e-5  # of the largest reference logit: float32 partial sums added in another order

ALL = sorted(FAMILIES)
# At TP 4 each rank would keep 4 heads of CodeGen's 16 split into its 4 fused groups: 1 head a group is
# fine, so every family runs at TP 4 too.
TP4 = ALL


# Two TP-2 groups in a world of 4 (consecutive ranks): a few families, rank 0's group reports.
GROUPED = ["gpt2", "llama", "mixtral", "t5"]


def _results(tmp: Path, tp: int, families: list[str], world: int = 0) -> dict[str, dict[str, Any]]:
    return family_results(tmp, "tests.worker.autotp.rank_main", tp, families, world, timeout=900)


@pytest.fixture(scope="module")
def tp2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return _results(tmp_path_factory.mktemp("autotp"), 2, ALL)


@pytest.fixture(scope="module")
def tp4(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return _results(tmp_path_factory.mktemp("autotp"), 4, TP4)


@pytest.fixture(scope="module")
def tp2_of_4(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return _results(tmp_path_factory.mktemp("autotp"), 2, GROUPED, world=4)


# MoE families -> how many experts modules they have (2 layers; DeepSeek's 3 with a dense first, some
# others' first layer dense or their MoE layers interleaved): each is split, every rank holding exactly 1/TP
# of its weights (before: DBRX's stacked 2D experts and GPT-OSS's transposed, biased ones stayed whole on
# every rank; Llama 4's transposed ones, OLMoE, FlexOlmo and MiniMax-M2 were refused)
MOE = {
    "afmoe": 1,
    "cohere2_moe": 2,
    "dbrx": 2,
    "deepseek_v2": 2,
    "deepseek_v3": 2,
    "ernie4_5_moe": 1,
    "exaone_moe": 2,
    "flex_olmo": 2,
    "glm4_moe": 1,
    "glm4_moe_lite": 2,
    "gpt_oss": 2,
    "granitemoe": 2,
    "granitemoeshared": 2,
    "hunyuan_v1_moe": 2,
    "llama4": 2,
    "mimo_v2_flash": 1,
    "minimax": 2,
    "minimax_m2": 2,
    "mixtral": 2,
    "olmoe": 2,
    "phimoe": 2,
    "qwen2_moe": 2,
    "qwen3_moe": 2,
    "solar_open": 2,
}
# MobileBERT's bottleneck projections read and write the residual stream and its vocabulary stays whole
# (its LM head is read as a weight, not called): 0.72 of the weights per rank at TP 2, 0.58 at TP 4.
# OLMo 2's attention stays whole (its q_norm / k_norm normalize all heads at once), a third of each layer
# here: 0.645 at TP 2, 0.467 at TP 4. DeepSeek's multi-head latent attention stays whole (its rope key,
# one for every head, comes from a projection that also feeds a norm): 0.637 / 0.455 (V2), 0.624 / 0.436
# (V3 and glm4_moe_lite, the same attention) here, where the experts are tiny; in DeepSeek-V3 the
# attention is about 2% of the weights.
MOSTLY_WHOLE = {
    "mobilebert": {2: 0.75, 4: 0.75},
    "olmo2": {2: 0.65, 4: 0.47},
    "deepseek_v2": {2: 0.64, 4: 0.46},
    "deepseek_v3": {2: 0.63, 4: 0.44},
    "glm4_moe_lite": {2: 0.63, 4: 0.44},
}


def _check(row: dict[str, Any], tp: int) -> None:
    assert "error" not in row, row["error"]
    assert "refused" not in row, row["refused"]
    assert row["max_abs_diff"] <= RTOL * max(row["ref_max_abs"], 1.0), row
    # init_inference checked its split against the whole model (split_check.py), far under its bound
    assert row["split_error"] is not None and row["split_error"] < 1e-4, row
    # each rank keeps about 1/tp of the weights; what stays whole (norms, position and relative-position
    # embeddings, routers, ALBERT's embedding projection) weighs up to 0.12 more in these tiny models
    assert "was already passed to init_inference (tp_size" in row["split_again"], row
    assert row["param_fraction"] <= MOSTLY_WHOLE.get(row["family"], {}).get(tp, 1 / tp + 0.15), row
    experts = row["experts_bytes"]
    if row["family"] in MOE:
        # a bias added after the down projection (GPT-OSS's) stays whole, zeroed past rank 0
        assert experts["modules"] == MOE[row["family"]] and experts["whole"] > 0, row
        assert experts["held"] * tp == experts["whole"] + (tp - 1) * experts["once"], row
    else:
        assert experts["modules"] == 0, row
    if row["kind"] in ("causal", "seq2seq"):
        assert row["tokens_equal"], f"greedy tokens differ from the single-process model: {row}"
    else:
        assert row["tokens_equal"] is None
    if row["kind"] == "causal":
        ref, split = row["pipeline_text"]
        assert split == ref and len(ref) > len("w5 w17 w42 w8"), f"transformers.pipeline text differs: {row}"


@pytest.mark.integration
@pytest.mark.parametrize("family", ALL)
def test_tp2_matches_single_process(family: str, tp2: dict[str, dict[str, Any]]) -> None:
    _check(tp2[family], 2)


@pytest.mark.integration
@pytest.mark.parametrize("family", TP4)
def test_tp4_matches_single_process(family: str, tp4: dict[str, dict[str, Any]]) -> None:
    _check(tp4[family], 4)


@pytest.mark.integration
@pytest.mark.parametrize("family", GROUPED)
def test_two_tp_groups_in_a_world_of_4(family: str, tp2_of_4: dict[str, dict[str, Any]]) -> None:
    _check(tp2_of_4[family], 2)


@pytest.mark.integration
def test_phi3_attention_is_split_across_ranks(tp2: dict[str, dict[str, Any]]) -> None:
    """Phi-3's fused q|k|v is split by heads (before: it and o_proj stayed whole on every rank, 64% of
    the weights on each of 2 ranks here, within the bound above only because this model is tiny)."""
    row = tp2["phi3"]
    _check(row, 2)
    assert "0 replicated linears" in row["plan"] and "2 attention modules" in row["plan"], row
    assert row["param_fraction"] < 0.51, row
