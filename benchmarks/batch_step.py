"""Where a large batch job's generation time goes: the decode step and the prefill items at the job's
shapes, run as a job runs them (CompiledStage warmed up for the micro-batch, eager prompt passes).

    python benchmarks/batch_step.py --lanes 256 --contexts 64,200,380 --prefill 1x160,50x160

A Llama-2-7B-shaped stage with random weights is built on the GPU (no checkpoint). For each context the
decode step of every lane at that position is timed (median of --steps, CUDA events) against the
roofline (weight bytes plus the KV bytes read, over the measured copy bandwidth), with the kernels of
one step; each prefill item ``NxS`` (N prompts of S tokens) is timed too. The KV contents are zeros:
the time does not depend on them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "worker"), str(ROOT)]

from benchmarks.common import SHAPES, save_report  # noqa: E402
from benchmarks.decode_step import build, kernel_summary, time_steps  # noqa: E402
from benchmarks.generate import measure_bandwidth  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-shape", default="llama2-7b", choices=list(SHAPES))
    p.add_argument("--lanes", type=int, default=256)
    p.add_argument("--max-len", type=int, default=512, help="cache positions: above the last context + steps")
    p.add_argument("--contexts", default="64,200,380")
    p.add_argument(
        "--prefill",
        default="1x160,50x160,50x32-255",
        help="items NxS (N prompts of S tokens) or NxA-B (A to B)",
    )
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--profile-top", type=int, default=10)
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="fp8: a float8 KV cache")
    p.add_argument("--out", default="benchmarks/results/batch_step.json")
    args = p.parse_args()

    from conveyor.inference.kernels.cuda_graphs import CompiledStage, CompileOptions

    dtype, device, b = torch.bfloat16, torch.device("cuda"), args.lanes
    bw = measure_bandwidth("cuda")
    from conveyor.inference.model.kv_cache import KV_CACHE_DTYPES

    kv_dtype = KV_CACHE_DTYPES[args.kv_cache_dtype]
    model = build(args.model_shape, dtype, b, args.max_len, kv_dtype)
    a = model.arch
    t0 = time.perf_counter()
    stage = CompiledStage.attach(model, CompileOptions.from_env(device, compile_prompts=False))
    warm = stage.warm_up(b)
    print(f"warm-up {time.perf_counter() - t0:.1f}s: {warm.seconds}", file=sys.stderr)
    elt = torch.tensor([], dtype=dtype).element_size()
    weight_bytes = sum(m.numel() * elt for m in model.parameters() if m.dim() == 2)
    report: dict = {
        "device": torch.cuda.get_device_name(),
        "bandwidth": bw,
        "lanes": b,
        "kv_cache_dtype": args.kv_cache_dtype,
        "rows": [],
    }
    kv_elt = elt if kv_dtype is None else 1 + 4 / a.head_dim  # float8 and a float32 scale per vector
    lanes = torch.arange(b, device=device)
    tokens = torch.randint(3, a.vocab_size, (b, 1), device=device)
    for context in (int(c) for c in args.contexts.split(",")):
        positions = torch.full((b, 1), context, device=device)

        def set_positions(i: int, positions: torch.Tensor = positions, context: int = context) -> None:
            positions.fill_(context + i)

        def step(positions: torch.Tensor = positions, context: int = context) -> torch.Tensor:
            with torch.inference_mode():
                return stage.decode(tokens, positions, lanes, context + args.steps + 1)

        step()
        kv_bytes = 2 * a.layers * b * a.kv_heads * a.head_dim * (context + args.steps / 2) * kv_elt
        ms = time_steps(step, set_positions, args.steps)
        row = {
            "what": "decode",
            "context": context,
            "ms": ms,
            "tokens_per_s": b / ms * 1e3,
            "roofline_ms": (weight_bytes + kv_bytes) / bw * 1e3,
            "kv_gb": kv_bytes / 1e9,
            "profile": kernel_summary(step, args.profile_top),
        }
        report["rows"].append(row)
        print(f"decode b{b} ctx {context}: {ms:.2f} ms (roofline {row['roofline_ms']:.2f})", file=sys.stderr)
    for item in args.prefill.split(","):
        # NxS: N prompts of S tokens; NxA-B: N prompts of A to B tokens (evenly spread), right-padded to
        # B at the cache's scratch slot as the scheduler pads them
        count, _, span = item.partition("x")
        n, shortest, s = int(count), int(span.partition("-")[0]), int(span.rpartition("-")[2])
        lengths = torch.linspace(shortest, s, n).round().long().tolist()
        ids = torch.randint(3, a.vocab_size, (n, s), device=device)
        pos = torch.full((n, s), model.cache.scratch_position, device=device)
        for i, length in enumerate(lengths):
            pos[i, :length] = torch.arange(length, device=device)
        item_lanes = torch.arange(n, device=device)

        def prefill(ids: torch.Tensor = ids, pos: torch.Tensor = pos, item_lanes: torch.Tensor = item_lanes):  # type: ignore[no-untyped-def]
            with torch.inference_mode():
                return stage.prompt(ids, pos, item_lanes, prefill=True)

        prefill()
        ms = time_steps(prefill, lambda i: None, 5)
        flops = 2 * weight_bytes / elt * sum(lengths)  # of the prompts' own tokens, padding aside
        row = {"what": "prefill", "prompts": n, "tokens": s, "real_tokens": sum(lengths), "ms": ms}
        row["tflops"] = flops / ms / 1e9
        row["profile"] = kernel_summary(prefill, args.profile_top)
        report["rows"].append(row)
        print(f"prefill {item}: {ms:.2f} ms ({row['tflops']:.0f} TFLOP/s of real tokens)", file=sys.stderr)
    save_report(report, args.out)


if __name__ == "__main__":
    main()
