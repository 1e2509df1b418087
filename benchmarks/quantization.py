"""Accuracy and decode speed of weight-only int8 against the unquantized model (default bf16).

    python benchmarks/quantization.py --model-shape llama2-7b            # GPU: accuracy + ms/token
    python benchmarks/quantization.py --model-shape tiny --device cpu    # seconds, a smoke test
    python benchmarks/quantization.py --model /models/llama --dtype bfloat16

One process, one stage (both models held at once). Accuracy over --prompts random prompts of
--prompt-len tokens: relative logit error ``|l_int8 - l| / |l|`` per position (mean, max; teacher
forcing over every prompt position), top-1 agreement at those positions, and greedy decoding of
--new-tokens: the share of sequences identical to the reference and the share of tokens generated
before the first divergence. Speed: decode ms/token of each through ``run_generation`` (whatever
decode path it takes: CUDA graphs / compile when the engine uses them) at each --batch-sizes, next to
its roofline (bytes one decode step reads: the weights as stored, int8 + scales for the quantized
linears, without the embedding table, plus the KV cache at the average context / copy bandwidth).

Model shapes come from benchmarks/common.py; model building, prompts, bandwidth and the KV-cache size
from benchmarks/generate.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker"))
sys.path.insert(0, str(ROOT))

from conveyor.testing.reference import one_process_rank  # noqa: E402 (after the path setup)

from benchmarks.common import SHAPES, save_report  # noqa: E402
from benchmarks.generate import (  # noqa: E402
    DTYPES,
    build_checkpoint,
    measure_bandwidth,
    prompts,
    sync,
)


def generate(
    model: Any, peers: Any, ids: list[list[int]], new: int, device: torch.device
) -> tuple[list[list[int]], float]:
    """Greedy tokens of every prompt (all in one micro-batch) and the decode seconds per step."""
    from conveyor.inference.pipeline.generate import Request, SchedulerHooks, run_generation
    from conveyor.inference.pipeline.sampling import SamplingParams

    got: dict[int, list[int]] = {}
    first: list[float] = []
    hooks = SchedulerHooks(
        on_result=lambda r: got.__setitem__(r.id, r.output_ids),
        on_first_token=lambda dt: first.append(time.perf_counter()),
    )
    sync(device.type)
    t0 = time.perf_counter()
    run_generation(
        model,
        peers,
        SamplingParams(),  # greedy, no stop tokens: every sequence runs `new` steps
        [Request(i, p, new) for i, p in enumerate(ids)],
        micro_batches=1,
        lanes_per_micro_batch=len(ids),
        device=device,
        hooks=hooks,
    )
    sync(device.type)
    decode = time.perf_counter() - (max(first) if first else t0)
    return [got[i] for i in range(len(ids))], decode / max(new - 1, 1)


def step_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer as stored, except embedding
    tables (a gather of a few rows; a tied LM head still counts, through the head)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def kv_bytes(model: Any, dtype: torch.dtype, batch: int, context: float) -> float:
    """KV cache bytes a decode step reads for ``batch`` sequences at ``context`` tokens each (as
    generate.py's roofline counts them)."""
    a, elt = model.arch, torch.tensor([], dtype=dtype).element_size()
    return batch * len(model.layers) * 2 * a.kv_heads * a.head_dim * context * elt


def main() -> None:
    from conveyor.inference.pipeline.quantize import all_logits, compare_logits

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF checkpoint directory (default: build --model-shape)")
    p.add_argument("--model-shape", default="llama2-7b", choices=list(SHAPES))
    p.add_argument(
        "--dtype",
        default=None,
        choices=list(DTYPES),
        help="the reference (and compute) dtype; default bfloat16 on CUDA, float32 on a CPU (CPU bf16 "
        "matmuls are slow enough to swamp a smoke run)",
    )
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"]
    )
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch-sizes", default="1,16", help="decode timing batches ('' to skip timing)")
    p.add_argument("--workdir", default="/tmp/conveyor-bench")
    p.add_argument("--out", default="benchmarks/results/quantization.json")
    args = p.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = (
        Path(args.model) if args.model else build_checkpoint(args.model_shape, dtype, args.device, workdir)
    )
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    plen, new = args.prompt_len, args.new_tokens
    lanes = max([args.prompts, *batches])
    models = {
        q: one_process_rank(
            model_dir, dtype=dtype, device=device, lanes=lanes, max_len=plen + new, quantization=q
        )
        for q in ("none", "int8")
    }

    ids = prompts(args.prompts, plen, vocab)
    logits = {q: all_logits(m, torch.tensor(ids, device=device)) for q, (m, _) in models.items()}
    report: dict[str, Any] = {
        "model": str(model_dir),
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "prompts": args.prompts,
        "prompt_len": plen,
        "new_tokens": new,
        **compare_logits(logits["none"], logits["int8"]),
    }
    del logits
    outputs = {q: generate(m, peers, ids, new, device)[0] for q, (m, peers) in models.items()}
    pairs = list(zip(outputs["none"], outputs["int8"], strict=True))
    before_divergence = sum(
        next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a)) for a, b in pairs
    )
    report["greedy_sequences_identical"] = sum(a == b for a, b in pairs) / len(pairs)
    report["greedy_tokens_before_divergence"] = before_divergence / sum(len(a) for a, _ in pairs)

    bw = measure_bandwidth(args.device)
    report["bandwidth_bytes_per_s"] = bw
    report["rows"] = []
    for b in batches:
        batch_ids = prompts(b, plen, vocab)
        for q, (m, peers) in models.items():
            kv = kv_bytes(m, dtype, b, plen + new / 2)  # the average context over the decode
            generate(m, peers, batch_ids, 4, device)  # warm-up (and compilation, if any)
            _, step = generate(m, peers, batch_ids, new, device)
            weights = step_bytes(m)
            roofline = (weights + kv) / bw
            report["rows"].append(
                {
                    "weights": "int8" if q == "int8" else args.dtype,
                    "batch": b,
                    "ms_per_token": step * 1e3,
                    "weight_bytes": weights,
                    "roofline_ms": roofline * 1e3,
                    "fraction_of_roofline": roofline / step,
                }
            )
    lines = [
        f"{model_dir.name}: int8 vs {args.dtype} on {report['device']}, {args.prompts} prompts x {plen} tokens, "
        f"{new} greedy tokens",
        "",
        f"relative logit error mean {100 * report['rel_logit_error_mean']:.2f}%, "
        f"max {100 * report['rel_logit_error_max']:.2f}%; top-1 agreement {100 * report['top1_agreement']:.1f}% "
        f"of {int(report['positions'])} positions; greedy sequences identical "
        f"{100 * report['greedy_sequences_identical']:.0f}%, tokens before divergence "
        f"{100 * report['greedy_tokens_before_divergence']:.0f}%",
    ]
    if report["rows"]:
        lines += [
            "",
            f"copy bandwidth {bw / 1e12:.2f} TB/s",
            "",
            "| weights | batch | decode ms/token | weight MB | roofline ms | % of roofline |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in report["rows"]:
            lines.append(
                f"| {r['weights']} | {r['batch']} | {r['ms_per_token']:.2f} | {r['weight_bytes'] / 1e6:.1f} | "
                f"{r['roofline_ms']:.2f} | {100 * r['fraction_of_roofline']:.0f}% |"
            )
    print("\n".join(lines))
    save_report(report, args.out)


if __name__ == "__main__":
    main()
