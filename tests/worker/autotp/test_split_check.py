"""``init_inference`` compares the split model with the whole one on a probe input (split_check.py), on
CPU processes with gloo. A family whose layout entry is taken out of layouts.py stands for a family
nobody listed: before the check its split was accepted with logits far off (shown here with
``verify_split=False``); now it is refused, naming the family and the fixes. Correct families in half
precision stay under the tolerance (bf16 rounding is not a refusal), and ranks given different weights
are refused on every rank. The family matrix (test_init_inference.py) runs with the check on."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conveyor.autotp.split_check import TOLERANCE, split_error

from tests.worker.autotp.families import family_results

UNLISTED = ["modernbert", "diffllama", "gpt_oss"]
HALF = ["llama", "gpt2", "t5", "bert", "mixtral", "dbrx"]
CLASS = {
    "modernbert": "ModernBertForMaskedLM",
    "diffllama": "DiffLlamaForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    scenarios = [f"{f}:unlisted" for f in UNLISTED] + [
        "modernbert:unlisted_unchecked",
        "diffllama:unlisted_unchecked",
    ]
    scenarios += [f"{f}:bf16" for f in HALF] + [f"{f}:to_bf16" for f in HALF] + ["llama:unseeded"]
    return family_results(
        tmp_path_factory.mktemp("split_check"),
        "tests.worker.autotp.split_check_main",
        2,
        scenarios,
        timeout=600,
    )


@pytest.mark.integration
@pytest.mark.parametrize("family", UNLISTED)
def test_a_mis_split_family_is_refused_by_name(family: str, rows: dict[str, dict[str, Any]]) -> None:
    row = rows[f"{family}:unlisted"]
    assert "refused" in row, row
    message = row["refused"]
    assert CLASS[family] in message and f"model_type {family!r}" in message, message
    assert "tp_size 1" in message and "layouts.py" in message, message


@pytest.mark.integration
@pytest.mark.parametrize("family", ["modernbert", "diffllama"])
def test_the_refused_split_is_really_wrong(family: str, rows: dict[str, dict[str, Any]]) -> None:
    """Unchecked, the same split runs and its logits are far off: the check is what refuses it."""
    row = rows[f"{family}:unlisted_unchecked"]
    assert row.get("accepted"), row
    assert row["logits_error"] > TOLERANCE[torch.bfloat16], row


@pytest.mark.integration
@pytest.mark.parametrize("how", ["bf16", "to_bf16"])
@pytest.mark.parametrize("family", HALF)
def test_bf16_rounding_is_not_refused(family: str, how: str, rows: dict[str, dict[str, Any]]) -> None:
    row = rows[f"{family}:{how}"]
    assert row.get("accepted"), row
    # on the test's prompt too: rounding (0.01 to 0.27 here) stays under the bound
    assert row["logits_error"] < TOLERANCE[torch.bfloat16], row


@pytest.mark.integration
def test_ranks_with_different_weights_are_refused_on_every_rank(rows: dict[str, dict[str, Any]]) -> None:
    """Rank 1's whole model is another seed's: rank 0 (whose reference its split matches less) refuses,
    and rank 1 did too, or this run would hang in the next scenario's collectives."""
    row = rows["llama:unseeded"]
    assert "refused" in row and "same weights" in row["refused"], row


def test_split_error_is_relative_to_the_output_norm() -> None:
    ref = torch.tensor([[3.0, -4.0]])  # norm 5
    assert split_error(ref.clone(), ref) == 0.0
    assert split_error(ref + torch.tensor([[0.0, 0.5]]), ref) == pytest.approx(0.1)
    assert split_error(ref.to(torch.bfloat16), ref) == 0.0
