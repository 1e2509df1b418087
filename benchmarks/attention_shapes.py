"""What a prompt pass's attention costs the first time it meets a shape, by backend.

    python benchmarks/attention_shapes.py --shapes 1x100,1x163,8x200,1x1900 --out results/attn.json

A job's prompt passes come in shapes that change from pass to pass (prompts per pass, the longest
prompt), and so do a serve replica's. SDPA's cuDNN backend builds an execution plan for each new shape
(tens of milliseconds; flashinfer measured 55-70 ms on a B200), where flash attention only launches.
For each backend and each shape ``NxS`` (N prompts of S tokens, causal, bf16, Llama-2-7B's 32 heads of
128), the first call is timed (host wall, synchronised) and then the median of later ones; torch's
variable-length flash kernel (``varlen_attn``, the packed passes') runs the same tokens packed.
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
sys.path[:0] = [str(ROOT / "worker"), str(ROOT)]

from benchmarks.common import save_report  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call, median of ``repeats`` later calls), in ms."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = (time.perf_counter() - t0) * 1e3
    later = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        later.append((time.perf_counter() - t0) * 1e3)
    return first, statistics.median(later)


def measure(n: int, s: int, heads: int, head_dim: int, repeats: int) -> dict[str, object]:
    """Each SDPA backend's first call and later calls on ``n`` prompts of ``s`` tokens, and
    ``varlen_attn``'s on the same tokens packed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (torch.randn(n, heads, s, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    row: dict[str, object] = {}
    for name, backend in (
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):

        def run(backend: SDPBackend = backend) -> None:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)

        try:
            first, later = timed(run, repeats)
            row[name] = {"first_ms": first, "ms": later}
        except RuntimeError as err:  # the backend does not serve this shape
            row[name] = {"error": str(err)[:200]}
    packed = [t.transpose(1, 2).reshape(n * s, heads, head_dim) for t in (q, k, v)]
    cu = torch.arange(0, (n + 1) * s, s, device="cuda", dtype=torch.int32)
    first, later = timed(lambda: varlen_attn(*packed, cu, cu, s, s, window_size=(-1, 0)), repeats)
    row["varlen"] = {"first_ms": first, "ms": later}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1x97,1x163,1x251,1x1003,1x1900,8x120,8x200,50x160,50x161")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/attention_shapes.json")
    args = p.parse_args()
    rows = []
    # the first call of each backend loads its library and kernels: paid here, on a shape not reported
    for shape in ["2x64", *args.shapes.split(",")]:
        n, s = (int(x) for x in shape.split("x"))
        row = {"shape": shape, **measure(n, s, args.heads, args.head_dim, args.repeats)}
        print(row, file=sys.stderr, flush=True)
        if shape != "2x64":
            rows.append(row)
    save_report({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
