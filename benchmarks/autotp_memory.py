"""Issue 24's memory table on a 13B-class model: for TP 1, 2, 4, the GPU memory each rank holds after
``conveyor.init_inference`` and the largest batch that ``generate`` runs under a per-rank cap.

    python benchmarks/autotp_memory.py --ckpt-dir /tmp/ckpt13b --cap-gib 32 --out $OUT/autotp_memory.json

(DeepSpeed's own table for OPT-13B in fp16: 23.9 GB, 12.2 GB, 6.4 GB per GPU on 1, 2, 4 V100s of 32 GB.)

The model (``--shape llama2-13b``: hidden 5120, 40 layers, 40 heads, intermediate 13824, vocab 32000)
has random weights, written once to ``--ckpt-dir`` (benchmarks/random_checkpoint.py; reused when
complete). Each rank builds the HF model on the meta device and calls ``init_inference(...,
checkpoint=DIR)``, so it reads only its slices and never holds the full model. Per rank, after
``init_inference``: ``torch.cuda.memory_allocated`` and ``max_memory_allocated`` (the peak while
loading). Then the batch search: ``torch.cuda.set_per_process_memory_fraction`` makes ``--cap-gib`` a
real allocation limit in each rank, and ``generate`` (``--prompt-len`` random tokens, exactly
``--new-tokens`` greedy ones) is tried at batch 1, 2, 4, ... until one runs out of memory, then bisected
to within ``--precision``; all ranks agree on every outcome (one all-reduce), and ``--search-seconds``
bounds the search (the last bracket is reported).

With fewer GPUs than ranks the ranks share GPU 0 over gloo (benchmarks/ranks.py; the output says
"ranks sharing one GPU"): the memory numbers are per process and hold as they are; times are not
one-GPU-per-rank times (gloo moves every all-reduce through the host). On the CPU (tests) the cap is
applied to a model of the bytes (this rank's parameters plus the KV cache of the batch), and the memory
columns are left empty.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "worker"), str(ROOT)]

from benchmarks.common import SHAPES, llama_config, save_report  # noqa: E402
from benchmarks.ranks import layout, run_group, tail  # noqa: E402

GB = 1e9
GIB = 1 << 30


def largest_batch(
    fits: Callable[[int], bool], max_batch: int, precision: float = 0.0, deadline: float = float("inf")
) -> dict[str, Any]:
    """The largest batch ``b <= max_batch`` with ``fits(b)``, assuming fitting is monotone: doubling from 1
    until a batch fails (or ``max_batch`` fits), then bisection until ``hi - lo <= max(1, precision *
    lo)``. A try that would end past ``deadline`` (``time.perf_counter()``; its time predicted from the
    last try's, in proportion to the batch) is not started: the search stops with the bracket [lo, hi)."""
    tries: list[dict[str, Any]] = []
    stopped = False

    def attempt(b: int) -> bool | None:
        nonlocal stopped
        now = time.perf_counter()
        predicted = tries[-1]["seconds"] * b / tries[-1]["batch"] if tries else 0.0
        if now + predicted > deadline:
            stopped = True
            return None
        ok = fits(b)
        tries.append({"batch": b, "fits": ok, "seconds": round(time.perf_counter() - now, 2)})
        return ok

    lo, hi = 0, None  # lo fits (0: nothing yet), hi does not (None: not found)
    b = 1
    while hi is None and lo < max_batch and (ok := attempt(b)) is not None:
        if ok:
            lo, b = b, min(2 * b, max_batch)
        else:
            hi = b
    while hi is not None and hi - lo > max(1, precision * lo) and (ok := attempt((lo + hi) // 2)) is not None:
        lo, hi = ((lo + hi) // 2, hi) if ok else (lo, (lo + hi) // 2)
    return {
        "largest": lo,  # fits
        "first_failing": hi,  # the smallest batch seen failing (None: none failed)
        "stopped_by_deadline": stopped,
        "capped": lo == max_batch,
        "tries": tries,
    }


def kv_bytes_per_token(config: Any, tp: int, dtype: torch.dtype) -> int:
    """One sequence's KV cache bytes per token on one rank (keys and values of every layer)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * (kv_heads // tp) * head_dim * size


# ---- one rank ---------------------------------------------------------------------------------------


def rank_main(args: argparse.Namespace) -> None:
    import conveyor
    import torch.distributed as dist
    import transformers

    torch.set_num_threads(1)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    info = conveyor.init_distributed(backend=args.backend, device=args.device)
    on_gpu = info.device.type == "cuda"
    cap = int(args.cap_gib * GIB)
    if on_gpu:
        # before the first allocation: the caching allocator refuses to grow past it (a real OOM)
        torch.cuda.set_per_process_memory_fraction(
            min(cap / torch.cuda.get_device_properties(0).total_memory, 1.0)
        )
    dtype = getattr(torch, args.dtype)
    tp = info.world_size
    config = transformers.AutoConfig.from_pretrained(args.ckpt_dir)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    timings["start"] = time.perf_counter() - t0
    row: dict[str, Any] = {"rank": info.rank}
    t1 = time.perf_counter()
    engine = None
    try:
        engine = conveyor.init_inference(
            model, tensor_parallel={"tp_size": tp}, dtype=dtype, checkpoint=args.ckpt_dir, device=info.device
        )
    except torch.OutOfMemoryError as err:
        row["load_error"] = f"out of memory under the {args.cap_gib} GiB cap while loading: {str(err)[:200]}"
    timings["init_inference"] = time.perf_counter() - t1
    params = 0
    if engine is not None:
        params = engine.load_report.param_bytes
        row.update(param_bytes=params, load_peak_param_bytes=engine.load_report.peak_bytes)
        if on_gpu:
            row.update(
                allocated=torch.cuda.memory_allocated(), max_allocated=torch.cuda.max_memory_allocated()
            )
    search: dict[str, Any] = {}
    if _agree(engine is not None, info.device):
        assert engine is not None
        module = engine.module
        t2 = time.perf_counter()

        def fits(batch: int) -> bool:
            ok = _try_generate(module, batch, args, info.device, cap, params, config, tp, dtype)
            return _agree(ok, info.device)

        search = largest_batch(fits, args.max_batch, args.precision, deadline=t2 + args.search_seconds)
        timings["search"] = time.perf_counter() - t2
    row["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    rows: list[Any] = [None] * tp
    dist.all_gather_object(rows, row)
    if info.rank == 0:
        Path(args.rank_out).write_text(json.dumps({"ranks": rows, "search": search}))


def _agree(ok: bool, device: torch.device) -> bool:
    """Every rank's verdict, so that all ranks try the same next batch (a rank that went on alone would
    wait forever in the next collective)."""
    import torch.distributed as dist

    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _try_generate(
    module: Any, batch: int, args: argparse.Namespace, device: torch.device, cap: int, params: int, config: Any,
    tp: int, dtype: torch.dtype,
) -> bool:  # fmt: skip
    if device.type == "cpu":  # tests: the cap applies to the bytes a GPU rank would hold
        need = params + kv_bytes_per_token(config, tp, dtype) * batch * (args.prompt_len + args.new_tokens)
        if need > cap:
            return False
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, config.vocab_size, (batch, args.prompt_len), generator=g).to(device)  # [B, S]
    ok = True
    try:
        with torch.inference_mode():
            module.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,  # random weights: no early end token shortens the cache
                do_sample=False,
                pad_token_id=0,
            )
    except torch.OutOfMemoryError:
        ok = False
    # the failed attempt's tensors are referenced from its traceback frames until collected
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ok


# ---- the driver -------------------------------------------------------------------------------------


def markdown(rows: list[dict[str, Any]], cap_gib: float, on_gpu: bool) -> str:
    lines = [
        f"| TP | layout | parameters per rank (GB) | allocated after init_inference (GB) | peak while loading (GB) "
        f"| largest batch under {cap_gib:g} GiB | load s | search s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tp']} | {r['layout']} | {r['error'][:80]} | | | | | |")
            continue
        ranks = r["ranks"]

        def gb(key: str, ranks: list[dict[str, Any]] = ranks) -> str:
            vals = [x[key] / GB for x in ranks if key in x]
            return (
                ""
                if not vals
                else f"{max(vals):.3g}"
                if max(vals) - min(vals) < 0.05
                else f"{min(vals):.3g}-{max(vals):.3g}"
            )

        s = r.get("search") or {}
        if not s:
            batch = next((x["load_error"] for x in ranks if "load_error" in x), "did not load")[:60]
        else:
            hi = s["first_failing"]
            batch = str(s["largest"]) + (f" (< {hi})" if hi is not None and hi - s["largest"] > 1 else "")
            batch += " (search stopped at --search-seconds)" if s["stopped_by_deadline"] else ""
            batch += " (= --max-batch)" if s["capped"] else ""
        t = ranks[0]["timings_s"]
        lines.append(
            f"| {r['tp']} | {r['layout']} | {gb('param_bytes')} | {gb('allocated') if on_gpu else ''} "
            f"| {gb('max_allocated') if on_gpu else ''} | {batch} | {t.get('init_inference', '')} | {t.get('search', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--ckpt-dir", required=True, help="where the random checkpoint is written (reused if complete)"
    )
    p.add_argument("--shape", default="llama2-13b", choices=list(SHAPES))
    p.add_argument("--tp", type=lambda s: [int(t) for t in s.split(",")], default=[1, 2, 4])
    p.add_argument("--cap-gib", type=float, default=32.0, help="per-rank memory cap (a V100: 32)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--precision", type=float, default=0.1, help="bisect until hi - lo <= max(1, this x lo)")
    p.add_argument("--search-seconds", type=float, default=45, help="per TP size; the bracket is reported")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--timeout", type=float, default=400, help="seconds for one TP size's group of ranks")
    p.add_argument("--out", default="benchmarks/results/autotp_memory.json")
    p.add_argument("--rank-out", default="", help=argparse.SUPPRESS)  # set for a rank process
    p.add_argument("--backend", default="gloo", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_out:
        rank_main(args)
        return
    from benchmarks.random_checkpoint import ensure_checkpoint

    t0 = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    lays = {tp: layout(tp, args.device) for tp in args.tp}
    on_gpu = any(lay.device == "cuda" for lay in lays.values())
    gpu = torch.device("cuda" if on_gpu else "cpu")
    total = torch.cuda.get_device_properties(0).total_memory if on_gpu else 0
    for tp, lay in lays.items():
        if lay.shared_gpu and tp * args.cap_gib * GIB > total:
            print(f"warning: TP {tp} x {args.cap_gib} GiB exceeds the GPU's {total / GIB:.0f} GiB: the cap may "
                  "not be reached before the GPU is full", file=sys.stderr)  # fmt: skip
    ckpt = ensure_checkpoint(llama_config(args.shape), args.ckpt_dir, dtype, gpu)
    if on_gpu:
        torch.cuda.empty_cache()  # the driver keeps only its context while the ranks run
    print(f"checkpoint: {ckpt}", flush=True)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="autotp_mem_"))
    for tp, lay in lays.items():
        out = work / f"tp{tp}.json"
        argv = [
            str(Path(__file__).resolve()), "--rank-out", str(out), "--ckpt-dir", args.ckpt_dir,
            "--cap-gib", str(args.cap_gib), "--prompt-len", str(args.prompt_len), "--new-tokens",
            str(args.new_tokens), "--max-batch", str(args.max_batch), "--precision", str(args.precision),
            "--search-seconds", str(args.search_seconds), "--dtype", args.dtype, "--backend", lay.backend,
            "--device", lay.device,
        ]  # fmt: skip
        group = run_group(argv, lay, work, f"tp{tp}", args.timeout)
        row: dict[str, Any] = {"tp": tp, "layout": lay.note, "group_seconds": round(group.seconds, 1)}
        if out.exists():
            row.update(json.loads(out.read_text()))
        else:
            row["error"] = group.failure(args.timeout) or f"no result: {tail(group.logs[0])}"
        rows.append(row)
        t = row["ranks"][0]["timings_s"] if "ranks" in row else {}
        tries = row.get("search", {}).get("tries", [])
        print(f"TP {tp}: group {row['group_seconds']} s (start {t.get('start')} s, init_inference "
              f"{t.get('init_inference')} s, search {t.get('search')} s over {len(tries)} tries: "
              f"{[(x['batch'], x['fits'], x['seconds']) for x in tries]}) {row.get('error', '')}", flush=True)  # fmt: skip
    table = markdown(rows, args.cap_gib, on_gpu)
    report = {
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "shape": args.shape,
        "dtype": args.dtype,
        "cap_gib": args.cap_gib,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "checkpoint": ckpt,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
        "table": table,
    }
    save_report(report, args.out)
    print("\n".join(f"TP {tp}: {lay.note}" for tp, lay in lays.items()))
    print(f"({args.shape}, {args.dtype}; batch: prompt {args.prompt_len} + {args.new_tokens} new tokens, "
          f"greedy; checkpoint {'written' if ckpt['written'] else 'reused'}; total {report['seconds']} s)\n")  # fmt: skip
    print(table)


if __name__ == "__main__":
    main()
