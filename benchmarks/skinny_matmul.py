"""The decode step's matrix products alone: cuBLAS against the Triton skinny kernel, on a 7B model's shapes.

    python benchmarks/skinny_matmul.py --batch-sizes 1,16,64 --budget-s 420

For each weight shape of a Llama-2-7B layer (and the LM head) and each batch, times ``x @ W^T`` with
cuBLAS (``F.linear``) and with ``conveyor.inference.kernels.skinny_matmul`` over a sweep of tile shapes, each in
a CUDA graph of back-to-back calls over enough copies of the weight that none is read from L2. Reports
microseconds per product and the bandwidth reached (weight bytes / time), next to the copy bandwidth
measured in the same run, and the best tiles per shape (what ``skinny_matmul.CANDIDATES`` is drawn from).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker"))
sys.path.insert(0, str(ROOT))

from benchmarks.common import save_report  # noqa: E402
from benchmarks.generate import measure_bandwidth  # noqa: E402

# (name, N, K) of Llama-2-7B: fused q|k|v, attention output, fused gate|up, down, LM head.
SHAPES = [
    ("wqkv", 12288, 4096),
    ("wo", 4096, 4096),
    ("w_in", 22016, 4096),
    ("w_out", 4096, 11008),
    ("lm_head", 32000, 4096),
]


def time_graph(fn, copies: int, reps: int = 24) -> float:  # type: ignore[no-untyped-def]
    """Microseconds per call of ``fn(i)`` (i: which weight copy), calls back to back in one CUDA graph."""
    from conveyor.inference.kernels.skinny_matmul import time_in_graph

    return time_in_graph(lambda i: fn(i % copies), reps)


def candidates(m: int):  # type: ignore[no-untyped-def]
    from conveyor.inference.kernels.skinny_matmul import Tiles

    if m == 1:
        grid = itertools.product((4, 8, 16, 32), (256, 512, 1024), (2, 4, 8), (3, 4, 5))
    else:
        grid = itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (3, 4, 5))
    for bn, bk, warps, stages in grid:
        yield Tiles(bn, bk, warps, stages)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="the whole sweep's time, shared by the cases"
    )
    parser.add_argument("--out", default="benchmarks/results/skinny_matmul.json")
    args = parser.parse_args()
    from conveyor.inference.kernels.skinny_matmul import skinny_matmul

    batches = [int(b) for b in args.batch_sizes.split(",")]
    per_case = args.budget_s / (len(batches) * len(SHAPES))
    bandwidth = measure_bandwidth("cuda")
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    report: dict = {"device": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth, "rows": []}
    dtype = torch.bfloat16
    for m in batches:
        for name, n, k in SHAPES:
            began = time.monotonic()
            nbytes = n * k * 2
            copies = max(2, -(-400_000_000 // nbytes))
            weights = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(copies)]
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = F.linear(x, weights[0]).float()
            cublas = time_graph(lambda i, x=x, w=weights: F.linear(x, w[i]), copies)
            row = {"m": m, "shape": name, "n": n, "k": k, "bytes": nbytes, "cublas_us": cublas, "sweep": []}
            best = None
            for tiles in candidates(m):
                if time.monotonic() - began > per_case:
                    break
                try:
                    got = skinny_matmul(x, weights[0], tiles)
                    err = (got.float() - ref).abs().max().item()
                    if err > 0.05 * ref.abs().max().item():
                        print(f"  {tiles} wrong: max error {err}", flush=True)
                        continue
                    us = time_graph(lambda i, x=x, w=weights, t=tiles: skinny_matmul(x, w[i], t), copies)
                except Exception as e:  # a tile shape that does not compile (shared memory) is skipped
                    print(f"  {tiles}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                row["sweep"].append({"tiles": tiles.__dict__, "us": us})
                if best is None or us < best[1]:
                    best = (tiles, us)
            del weights
            torch.cuda.empty_cache()
            if best is not None:
                row["best"] = {"tiles": best[0].__dict__, "us": best[1]}
                print(
                    f"M={m:3d} {name:8s} cuBLAS {cublas:7.1f} us {nbytes / cublas / 1e3:6.0f} GB/s | "
                    f"triton {best[1]:7.1f} us {nbytes / best[1] / 1e3:6.0f} GB/s {best[0]}",
                    flush=True,
                )
            report["rows"].append(row)
            save_report(report, args.out)


if __name__ == "__main__":
    main()
