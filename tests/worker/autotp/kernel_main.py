"""One rank of the kernel-inject comparison: for each family, the single-process HF model's logits and
greedy tokens (a full batch, and a left-padded one) and ``transformers.pipeline`` text, then ``init_inference(...,
replace_with_kernel_inject=True)`` and the same calls on ``engine.module``. Rank 0 writes one JSON line
per family to OUT.

    python -m tests.worker.autotp.kernel_main OUT TP FAMILY [FAMILY ...]
"""

from __future__ import annotations

from typing import Any

import conveyor
import torch

from tests.worker.autotp.families import build, prompt, run_family_checks
from tests.worker.autotp.rank_main import _pipeline_text

NEW = 8


def _padded() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 7, 4 and 6 tokens, left-padded with 0 (HF's decoder-only batching)."""
    ids = prompt(seed=3).repeat(2, 1)[:3]  # [3, 7]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _run(module: Any, hf: bool) -> dict[str, torch.Tensor]:
    ids = prompt()
    pids, pmask = _padded()
    # each padded row's tokens from position 0, as HF's generate places them (HF's forward needs them
    # spelled out; the fast module reads them from the mask)
    positions = {"position_ids": (pmask.cumsum(-1) - 1).clamp(min=0)} if hf else {}
    with torch.no_grad():
        return {
            "logits": module(ids).logits.float(),
            "padded_logits": module(pids, attention_mask=pmask, **positions).logits.float(),
            "tokens": module.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0),
            "padded_tokens": module.generate(
                pids, attention_mask=pmask, max_new_tokens=NEW, do_sample=False, pad_token_id=0
            ),
        }


def check(family: str, tp: int) -> dict[str, Any]:
    model, _ = build(family)
    ref = _run(model, hf=True)
    ref_text = _pipeline_text(model)
    engine = conveyor.init_inference(
        model, tensor_parallel={"tp_size": tp}, dtype=torch.float32, replace_with_kernel_inject=True
    )
    got = _run(engine.module, hf=False)
    text = _pipeline_text(engine.module)
    real = _padded()[1].bool()  # logits of padding positions are meaningless in both
    sampled = engine.module.generate(prompt(), max_new_tokens=NEW, do_sample=True, top_k=20, temperature=0.7)
    # sampling from the single most likely token is greedy decoding: top_k reaches the sampler
    top1 = engine.module.generate(prompt(), max_new_tokens=NEW, do_sample=True, top_k=1, temperature=1.3)
    try:
        engine.module.generate(prompt(), max_new_tokens=2, num_beams=2)
        beams = "accepted"
    except conveyor.autotp.AutoTPError as err:
        beams = str(err)
    return {
        "family": family,
        "kernel_injected": engine.kernel_injected,
        "hf_weights_released": all(p.is_meta for p in model.parameters()),
        "ref_max_abs": float(ref["logits"].abs().max()),
        "max_abs_diff": float((got["logits"] - ref["logits"]).abs().max()),
        "padded_max_abs_diff": float((got["padded_logits"] - ref["padded_logits"])[real].abs().max()),
        "tokens_equal": bool(torch.equal(got["tokens"], ref["tokens"])),
        "padded_tokens_equal": bool(torch.equal(got["padded_tokens"], ref["padded_tokens"])),
        "tokens": got["tokens"].tolist(),
        "ref_tokens": ref["tokens"].tolist(),
        "sampled_shape": list(sampled.shape),
        "sampled_prompt_kept": bool(torch.equal(sampled[:, : prompt().shape[1]], prompt())),
        "top1_is_greedy": bool(torch.equal(top1, ref["tokens"])),
        "num_beams_refusal": beams,
        "pipeline_text": [ref_text, text],
    }


def main() -> None:
    run_family_checks(check)


if __name__ == "__main__":
    main()
    # as conveyor.rank does: the interpreter's teardown of a gloo group can abort a finished rank
    # ("terminate called without an active exception", seen 1 run in 10)
    from conveyor.rank import exit_now

    exit_now(0)
