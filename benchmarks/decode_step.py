"""Where a decode step's time goes: the stage model's step alone, under each way of running it.

    python benchmarks/decode_step.py --batch-sizes 1,16,64 --variants eager,graph,compiled

Builds a Llama-2-7B-shaped StageModel with random weights directly on the GPU (no checkpoint), fills
the KV cache with a prompt, then times decode steps with CUDA events (median of --steps):

* eager     the model's forward, launched from Python;
* graph     the forward captured in a CUDA graph (what CompiledStage does without compiling);
* compiled  torch.compile'd forward (inductor fuses the elementwise work), captured in a CUDA graph;
* product   the decode step as generation runs it (cuda_graphs.CompiledStage: compiled, captured, and
            each linear layer on cuBLAS or the Triton skinny kernel, whichever skinny_matmul.tune
            measured faster);
* linears   only the matrix products of a step (every weight read once), in a CUDA graph: what cuBLAS
            gives for the bytes that set the roofline.

Also prints the kernels of one eager step (count and the sum of their durations: the GPU time with no
launch gaps). The roofline is the weight bytes plus the KV bytes at the step's context over the measured
copy bandwidth.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker"))
sys.path.insert(0, str(ROOT))

from benchmarks.common import SHAPES, llama_config, save_report  # noqa: E402
from benchmarks.generate import measure_bandwidth  # noqa: E402


def build(shape: str, dtype: torch.dtype, lanes: int, max_len: int, kv_dtype: torch.dtype | None = None):  # type: ignore[no-untyped-def]
    from conveyor.inference.model.families import arch_from_config
    from conveyor.inference.model.stage_model import StageModel

    arch = arch_from_config(llama_config(shape))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = StageModel(arch, range(arch.layers), first=True, last=True).to(dtype).eval()
    model.setup_cache(lanes, max_len, dtype, torch.device("cuda"), kv_dtype)
    return model


def time_steps(step, set_positions, steps: int) -> float:  # type: ignore[no-untyped-def]
    """Median ms of ``step()`` over ``steps`` calls, positions advancing as in a real decode."""
    times = []
    for i in range(steps):
        set_positions(i)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def capture(fn):  # type: ignore[no-untyped-def]
    from conveyor.inference.kernels.cuda_graphs import warm_up

    warm_up(fn, times=3)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def kernel_summary(fn, top: int) -> dict:  # type: ignore[no-untyped-def]
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:90], []).append(e.device_time)
    rows = sorted(((sum(v), len(v), k) for k, v in by_name.items()), reverse=True)
    return {
        "kernels": len(kernels),
        "kernel_ms": sum(e.device_time for e in kernels) / 1e3,
        "top": [{"ms": t / 1e3, "count": c, "name": n} for t, c, n in rows[:top]],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-shape", default="llama2-7b", choices=list(SHAPES))
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--variants", default="eager,graph,compiled,linears")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--profile-top", type=int, default=12)
    p.add_argument("--out", default="benchmarks/results/decode_step.json")
    args = p.parse_args()
    dtype = torch.bfloat16
    batches = [int(b) for b in args.batch_sizes.split(",")]
    # product routes the model's linear layers through skinny_matmul for the rest of the run: time it last
    variants = sorted(args.variants.split(","), key=lambda v: v == "product")
    bw = measure_bandwidth("cuda")
    max_len = args.prompt_len + args.steps + 8
    model = build(args.model_shape, dtype, max(batches), max_len)
    a = model.arch
    elt = torch.tensor([], dtype=dtype).element_size()
    weight_bytes = sum(
        m.weight.numel() * elt for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    )
    report: dict = {
        "bandwidth": bw,
        "device": torch.cuda.get_device_name(),
        "rows": [],
        "torch": torch.__version__,
    }
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; linear weights {weight_bytes / 1e9:.2f} GB", file=sys.stderr)
    compiled_forward = None
    for b in batches:
        tokens = torch.randint(3, a.vocab_size, (b, args.prompt_len), device="cuda")
        positions = torch.arange(args.prompt_len, device="cuda").expand(b, -1).contiguous()
        with torch.inference_mode():
            model(tokens, positions, 0)  # prefill every lane at once
        step_tokens = torch.randint(3, a.vocab_size, (b, 1), device="cuda")
        step_positions = torch.full((b, 1), args.prompt_len, device="cuda")

        def set_positions(i: int, step_positions: torch.Tensor = step_positions) -> None:
            step_positions.fill_(args.prompt_len + i)

        kv_bytes = 2 * a.layers * b * a.kv_heads * a.head_dim * (args.prompt_len + args.steps / 2) * elt
        roofline_ms = (weight_bytes + kv_bytes) / bw * 1e3
        row: dict = {"batch": b, "roofline_ms": roofline_ms}

        def forward(step_tokens: torch.Tensor = step_tokens, step_positions: torch.Tensor = step_positions):  # type: ignore[no-untyped-def]
            with torch.inference_mode():
                return model(step_tokens, step_positions, 0)

        for v in variants:
            t0 = time.perf_counter()
            try:
                if v == "eager":
                    row["eager_ms"] = time_steps(forward, set_positions, args.steps)
                    row["eager_profile"] = kernel_summary(forward, args.profile_top)
                elif v == "graph":
                    g = capture(forward)
                    row["graph_ms"] = time_steps(g.replay, set_positions, args.steps)
                elif v == "compiled":
                    if compiled_forward is None:
                        mode = None if args.compile_mode == "default" else args.compile_mode
                        compiled_forward = torch.compile(
                            model.forward, fullgraph=True, dynamic=False, mode=mode
                        )

                    def cforward(st=step_tokens, sp=step_positions, fn=compiled_forward):  # type: ignore[no-untyped-def]
                        with torch.inference_mode():
                            return fn(st, sp, 0)

                    g = capture(cforward)
                    row["compile_s"] = time.perf_counter() - t0
                    row["compiled_ms"] = time_steps(g.replay, set_positions, args.steps)
                    row["compiled_profile"] = kernel_summary(cforward, args.profile_top)
                elif v == "product":
                    from conveyor.inference.kernels.cuda_graphs import CompiledStage

                    graphed = CompiledStage(model)
                    kv_len = args.prompt_len + args.steps + 1

                    def pforward(st=step_tokens, sp=step_positions, g=graphed, kv_len=kv_len):  # type: ignore[no-untyped-def]
                        with torch.inference_mode():
                            return g.decode(st, sp, 0, kv_len)

                    pforward()
                    row["compile_s"] = time.perf_counter() - t0
                    row["product_ms"] = time_steps(pforward, set_positions, args.steps)
                    row["product_profile"] = kernel_summary(pforward, args.profile_top)
                elif v == "linears":
                    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
                    widest = max(m.in_features for m in linears)
                    x = torch.randn(b, widest, device="cuda", dtype=dtype)

                    def only_linears(x: torch.Tensor = x, linears: list = linears) -> None:  # type: ignore[type-arg]
                        with torch.inference_mode():
                            for m in linears:
                                F.linear(x[:, : m.in_features], m.weight)

                    g = capture(only_linears)
                    row["linears_ms"] = time_steps(g.replay, lambda i: None, args.steps)
            except Exception as e:  # a variant that fails is reported, not fatal
                row[f"{v}_error"] = f"{type(e).__name__}: {e}"[:2000]
                print(f"batch {b} {v}: {row[f'{v}_error']}", file=sys.stderr)
            print(f"batch {b} {v} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        report["rows"].append(row)
        del tokens, positions
    save_report(report, args.out)
    print(f"{args.model_shape} bf16 on {report['device']}, torch {torch.__version__}, {bw / 1e12:.2f} TB/s")
    print("| batch | roofline ms | " + " | ".join(f"{v} ms" for v in variants) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in variants) + " |")
    for r in report["rows"]:
        cells = [f"{r[f'{v}_ms']:.3f}" if f"{v}_ms" in r else "err" for v in variants]
        print(f"| {r['batch']} | {r['roofline_ms']:.3f} | " + " | ".join(cells) + " |")
    for r in report["rows"]:
        for key in ("eager_profile", "compiled_profile", "product_profile"):
            if key in r:
                prof = r[key]
                print(
                    f"batch {r['batch']} {key}: {prof['kernels']} kernels, {prof['kernel_ms']:.3f} ms of kernels"
                )
                for t in prof["top"][: args.profile_top]:
                    print(f"   {t['ms']:.3f} ms  x{t['count']}  {t['name']}")


if __name__ == "__main__":
    main()
