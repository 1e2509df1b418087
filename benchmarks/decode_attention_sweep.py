"""The decode attention kernel's tile, warps and pipeline depth at a batch job's shapes, against HBM.

    python benchmarks/decode_attention_sweep.py --lanes 256 --positions 32,383

One layer's call (kernels/decode_attention.py) of a Llama-2-7B-shaped cache, every lane at a position
drawn from ``--positions`` (a batch job's lanes sit at mixed contexts), timed for each configuration
(median of --iters, CUDA events) and set against the bytes of K/V the visible keys hold over the
measured copy bandwidth. Each configuration's output is checked against the first's. ``--caches
bf16,fp8`` runs the float8 cache's variant as well.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "worker"), str(ROOT)]

from benchmarks.common import save_report  # noqa: E402
from benchmarks.generate import measure_bandwidth  # noqa: E402

CONFIGS = "64x4x3,32x1x3,64x4x2,64x2x3,32x4x3,32x1x2,32x1x4,16x1x3,128x4x2,128x8x2"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lanes", type=int, default=256)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--positions", default="32,383", help="lo,hi: each lane's position, uniform in [lo, hi]")
    p.add_argument("--configs", default=CONFIGS, help="BLOCK_LxWARPSxSTAGES,...; the first is the reference")
    p.add_argument("--iters", type=int, default=50, help="calls per CUDA graph timed")
    p.add_argument("--caches", default="bf16", help="bf16, fp8 (the float8 cache's variant) or both")
    p.add_argument("--out", default="benchmarks/results/decode_attention_sweep.json")
    args = p.parse_args()

    from conveyor.inference.kernels import decode_attention as da
    from conveyor.inference.kernels.skinny_matmul import time_in_graph

    torch.manual_seed(0)
    n, h, kvh, d = args.lanes, args.heads, args.kv_heads, args.head_dim
    lo, hi = (int(x) for x in args.positions.split(","))
    length = hi + 2  # the last slot is the scratch slot
    dev = torch.device("cuda")
    q = torch.randn(n, h, 1, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(n, kvh, length, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(n, kvh, length, d, device=dev, dtype=torch.bfloat16)
    positions = torch.randint(lo, hi + 1, (n, 1), device=dev)
    lanes = torch.arange(n, device=dev)
    visible = int((positions + 1).sum())
    bw = measure_bandwidth("cuda")
    scale = torch.rand(n, kvh, length, device=dev) + 0.5
    every = {
        "bf16": (k, v),
        "fp8": (k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn), scale, scale.clone()),
    }
    caches = {name: every[name] for name in args.caches.split(",")}
    rows = []
    defaults = (dict(da.TILES), da.stages)
    try:
        for name, cache in caches.items():
            # K and V of every visible key and KV head, and a float8 cache's two scales
            per_key = 2 * d * cache[0].element_size() + sum(t.element_size() for t in cache[2:])
            bytes_read = visible * kvh * per_key
            roofline_ms = bytes_read / bw * 1e3
            reference = None
            for config in args.configs.split(","):
                block, warps, depth = (int(x) for x in config.split("x"))
                da.TILES[name == "fp8"] = (block, warps)
                da.stages = lambda _blocks, _scaled=False, depth=depth: depth  # type: ignore[assignment]

                def call(cache=cache):
                    return da.decode_attention(
                        q, cache[0], cache[1], positions, lanes, length, 0, d**-0.5, *cache[2:]
                    )

                try:
                    out = call()
                    # back to back in one CUDA graph, as the decode step runs it: launched from Python, a
                    # layer's call (about 0.3 ms) would time the launches between the events as well
                    ms = time_in_graph(lambda _i, call=call: call(), args.iters) / 1000
                except Exception as err:  # a tile that does not fit shared memory
                    print(f"{name} {config}: {type(err).__name__}: {str(err)[:120]}", file=sys.stderr)
                    continue
                reference = out if reference is None else reference
                row = {
                    "cache": name,
                    "config": config,
                    "ms": round(ms, 4),
                    "tb_per_s": round(bytes_read / ms / 1e9, 3),
                    "of_roofline": round(roofline_ms / ms, 3),
                    "max_diff_vs_first": float((out.float() - reference.float()).abs().max()),
                }
                rows.append(row)
                print(row, flush=True)
    finally:
        da.TILES.update(defaults[0])
        da.stages = defaults[1]
    report = {
        "device": torch.cuda.get_device_name(),
        "lanes": n,
        "heads": h,
        "kv_heads": kvh,
        "head_dim": d,
        "positions": [lo, hi],
        "copy_bandwidth_tb_per_s": round(bw / 1e12, 3),
        "rows": rows,
    }
    save_report(report, args.out)


if __name__ == "__main__":
    main()
