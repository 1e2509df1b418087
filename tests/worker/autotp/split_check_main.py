"""One rank of the split check's scenarios: a family whose layout entry is taken out of layouts.py (as a
family nobody listed would be split) must be refused by ``init_inference``; with ``verify_split=False``
the same split is accepted and its logits are off (so what refuses it is the check, and the mis-split is
real); correct families in half precision are not refused by rounding; ranks given different weights are
refused on every rank. Rank 0 writes one JSON line per scenario to OUT.

    python -m tests.worker.autotp.split_check_main OUT TP SCENARIO [SCENARIO ...]

A scenario is ``FAMILY:HOW``: ``unlisted`` (its layouts.py entry removed), ``unlisted_unchecked`` (the
same with ``verify_split=False``), ``bf16`` (built in bfloat16), ``to_bf16`` (float32, ``dtype=bfloat16``),
``unseeded`` (each rank's model from another seed).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import conveyor
import torch
import torch.distributed as dist
from conveyor.autotp import layouts
from conveyor.autotp.split_check import split_error

from tests.worker.autotp.families import build, prompt, run_family_checks

# the layouts.py table that makes each family's split right
LISTED_IN = {
    "modernbert": layouts.FUSED_BLOCKS,  # its fused q|k|v, split as plain columns without it
    "diffllama": layouts.HEAD_HALVES,  # its paired heads
    "gpt_oss": layouts.HEAD_PARAMS,  # its per-head sinks
}
CLASSES = {
    "modernbert": "ModernBertAttention",
    "diffllama": "DiffLlamaAttention",
    "gpt_oss": "GptOssAttention",
}


@contextmanager
def _unlisted(family: str) -> Iterator[None]:
    table, name = LISTED_IN[family], CLASSES[family]
    before = table.copy()
    if isinstance(table, dict):
        del table[name]
    else:
        table.discard(name)
    try:
        yield
    finally:
        table.clear()
        table.update(before)  # type: ignore[arg-type]


def _logits(model: Any, kind: str) -> torch.Tensor:
    ids = prompt()
    extra = {"decoder_input_ids": ids[:, :3]} if kind == "seq2seq" else {}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits.float()


def check(scenario: str, tp: int) -> dict[str, Any]:
    family, how = scenario.split(":")
    seed = dist.get_rank() if how == "unseeded" else 0
    model, kind = build(family, seed=seed)
    if how == "bf16":
        model.to(torch.bfloat16)
    ref = _logits(model, kind)
    kwargs: dict[str, Any] = {"tensor_parallel": {"tp_size": tp}}
    if how == "to_bf16":
        kwargs["dtype"] = torch.bfloat16
    if how == "unlisted_unchecked":
        kwargs["verify_split"] = False
    row: dict[str, Any] = {"family": scenario}
    try:
        if how.startswith("unlisted"):
            with _unlisted(family):
                engine = conveyor.init_inference(model, **kwargs)
        else:
            engine = conveyor.init_inference(model, **kwargs)
    except conveyor.autotp.AutoTPError as err:
        return {**row, "refused": str(err)}
    return {**row, "accepted": True, "logits_error": split_error(_logits(engine.module, kind), ref)}


def main() -> None:
    run_family_checks(check)


if __name__ == "__main__":
    main()
    from conveyor.rank import exit_now

    exit_now(0)
