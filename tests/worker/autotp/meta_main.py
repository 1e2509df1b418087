"""One rank of the meta-device + ``checkpoint=`` comparison. The reference is the saved model loaded whole
with ``from_pretrained`` (logits, greedy tokens, buffers); the model under test is built on the meta
device from the same config and handed to ``init_inference(..., checkpoint=CKPT)``, where each rank
reads only its slices. Rank 0 writes one JSON line to OUT with both ranks' load reports.

    python -m tests.worker.autotp.meta_main OUT TP CKPT FAMILY [files|dir] [kernel]
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

import conveyor
import torch
import torch.distributed as dist
import transformers

from tests.worker.autotp.families import prompt


def _outputs(module: Any) -> tuple[torch.Tensor, torch.Tensor]:
    ids = prompt()
    with torch.no_grad():
        logits = module(ids).logits.float()
        tokens = module.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    return logits, tokens


def check(tp: int, ckpt: str, how: str, kernel: bool) -> dict[str, Any]:
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ref_logits, ref_tokens = _outputs(ref)
    ref_buffers = {n: b.clone() for n, b in ref.named_buffers()}
    config = transformers.AutoConfig.from_pretrained(ckpt)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    checkpoint: Any = sorted(str(p) for p in Path(ckpt).glob("*.safetensors")) if how == "files" else ckpt
    engine = conveyor.init_inference(
        model, tensor_parallel={"tp_size": tp}, checkpoint=checkpoint, replace_with_kernel_inject=kernel
    )
    logits, tokens = _outputs(engine.module)
    row: dict[str, Any] = {
        "kernel_injected": engine.kernel_injected,
        "ref_max_abs": float(ref_logits.abs().max()),
        "max_abs_diff": float((logits - ref_logits).abs().max()),
        "tokens_equal": bool(torch.equal(tokens, ref_tokens)),
    }
    if not kernel:
        module = engine.module
        buffers = dict(module.named_buffers())
        row["buffers_equal"] = {n: bool(torch.equal(buffers[n], b)) for n, b in ref_buffers.items()}
        row["on_meta"] = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        out_emb = module.get_output_embeddings()
        row["tied"] = out_emb is not None and out_emb.weight is module.get_input_embeddings().weight
        row["experts_implementation"] = getattr(module.config, "_experts_implementation", None)
        report = engine.load_report
        row["report"] = {
            "read_bytes": report.read_bytes,
            "full_bytes": report.full_bytes,
            "sliced": sorted(report.sliced),
            "param_bytes": report.param_bytes,
            "peak_bytes": report.peak_bytes,
            "held_param_bytes": sum(p.numel() * p.element_size() for p in module.parameters()),
        }
    return row


def main() -> None:
    out, tp, ckpt, family = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    how = sys.argv[5] if len(sys.argv) > 5 else "dir"
    kernel = "kernel" in sys.argv[6:]
    torch.set_num_threads(1)
    info = conveyor.init_distributed(backend="gloo", device="cpu")
    try:
        row = {"family": family, **check(tp, ckpt, how, kernel)}
    except Exception:
        row = {"family": family, "error": traceback.format_exc()[-2500:]}
    rows: list[Any] = [None] * info.world_size
    dist.all_gather_object(rows, row)
    if info.rank == 0:
        Path(out).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
    # as conveyor.rank does: the interpreter's teardown of a gloo group can abort a finished rank
    # ("terminate called without an active exception", seen 1 run in 10)
    from conveyor.rank import exit_now

    exit_now(0)
