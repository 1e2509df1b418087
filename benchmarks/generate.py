"""Decode speed of Conveyor's pipelined generation next to HF ``generate`` and the memory roofline.

    python benchmarks/generate.py --model-shape llama2-7b --batch-sizes 1,16 --layouts 1x1,2x1,1x2

Builds a random-weight model of the shape (no download) and saves it once under --workdir; measures
HBM bandwidth with a large device-to-device copy; times HF ``generate`` (1 device, eager, greedy) and
Conveyor for each layout PxT (P stages x T tensor-parallel ranks, one process per GPU, started here).
Decode ms/token = time per step once every sequence has its first token (all B sequences advance one
token per step); tokens/s = B / step. Roofline per step = max(micro-batches, stages) x the bytes one
GPU reads per micro-batch (its weight share and its share of the micro-batch's KV cache at the average
context) / bandwidth. Prints a markdown table and writes JSON (--out).

``--gpt-fast PATH`` also times gpt-fast from a checkout at PATH (``benchmarks/gpt_fast.py``: fetched for
the run, never committed). ``--model-shape tiny --device cpu`` runs the same code on a CPU in seconds (a
smoke test).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker"))
sys.path.insert(0, str(ROOT))

from conveyor.utils import free_port  # noqa: E402

from benchmarks.common import SHAPES, llama_config, save_report  # noqa: E402 (after the path setup)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_checkpoint(shape: str, dtype: torch.dtype, device: str, workdir: Path) -> Path:
    import transformers as T

    out = workdir / f"{shape}-{str(dtype).removeprefix('torch.')}"
    if (out / "config.json").exists():
        return out
    config = llama_config(shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = T.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    del model
    if device == "cuda":
        # the float32 build's blocks stay reserved otherwise: 26 GB that a job's worker, a process of
        # its own, cannot use (on an 80 GB card, out of memory at batch 256)
        gc.collect()
        torch.cuda.empty_cache()
    return out


def measure_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    if device == "cpu":
        n = 1 << 27
    else:
        n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * n * reps / (time.perf_counter() - t0)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


def bench_hf(
    model_dir: Path,
    dtype: torch.dtype,
    device: str,
    batches: list[int],
    plen: int,
    new: int,
    ttft_len: int = 0,
) -> dict:
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    out = {}
    for b in batches:
        ids = torch.tensor(prompts(b, plen, model.config.vocab_size), device=device)

        def run(n: int, ids: torch.Tensor = ids, model: Any = model) -> float:
            sync(device)
            t0 = time.perf_counter()
            model.generate(
                ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
            )
            sync(device)
            return time.perf_counter() - t0

        # Warm up with a whole generation and keep the faster of two: the first generate after
        # from_pretrained ran at 65 ms a token and the next at 22 on an H200 (Llama-2-7B shape, batch 1),
        # the loader's work still finishing behind it.
        run(new)
        step = min((run(new) - run(1)) / (new - 1) for _ in range(2))
        t1 = run(1)
        out[str(b)] = {"ms_per_token": step * 1e3, "tokens_per_s": b / step, "prefill_ms": t1 * 1e3}
    if ttft_len:
        ids = torch.tensor(prompts(1, ttft_len, model.config.vocab_size), device=device)
        times = []
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0)
            sync(device)
            times.append(time.perf_counter() - t0)
        out["ttft_ms"] = min(times[1:]) * 1e3
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def rank_worker(cfg: dict[str, Any]) -> None:
    """One rank of our pipeline: time each batch size; rank 0 writes the numbers to cfg['out']."""
    from conveyor.distributed import destroy_distributed, init_distributed
    from conveyor.env import compile_cache_dir
    from conveyor.inference.kernels import compile_cache
    from conveyor.inference.kernels.cuda_graphs import CompiledStage, CompileOptions
    from conveyor.inference.pipeline.generate import (
        Request,
        SchedulerHooks,
        micro_batch_layout,
        run_generation,
    )
    from conveyor.inference.pipeline.sampling import SamplingParams
    from conveyor.inference.rank_builder import prepare_rank
    from conveyor.topology import Layout, Topology

    info = init_distributed(device=cfg["device"])
    topo = Topology(Layout(1, cfg["stages"], cfg["tp"]))
    batches, plen, new = cfg["batches"], cfg["prompt_len"], cfg["new_tokens"]
    dtype = DTYPES[cfg["dtype"]]
    model, peers = prepare_rank(
        cfg["model"],
        topo,
        dtype=dtype,
        device=info.device,
        lanes=max(batches) * (cfg["stages"] if cfg.get("fill_stages") else 1) + cfg["stages"],
        max_len=plen + new,
    )
    # each batch size below warms up with a short run of its own (the rank builder warms one size)
    options = CompileOptions.from_env(info.device)
    compile_cache.configure(compile_cache_dir())
    CompiledStage.attach(model, options)

    def timed(
        reqs: list[Request], m: int, lanes: int, hooks: SchedulerHooks | None = None
    ) -> tuple[float, float]:
        """perf_counter at the start and the end (device synchronized) of one greedy generation."""
        sync(cfg["device"])
        t0 = time.perf_counter()
        run_generation(
            model,
            peers,
            SamplingParams(),
            reqs,
            micro_batches=m,
            lanes_per_micro_batch=lanes,
            device=info.device,
            hooks=hooks,
        )
        sync(cfg["device"])
        return t0, time.perf_counter()

    results: dict[str, Any] = {}
    waited = [0.0]
    for b in batches:
        # fill_stages: b lanes in each of P micro-batches (a batch per stage in flight, as vLLM keeps);
        # otherwise the b sequences split over the micro-batches
        m, lanes = (cfg["stages"], b) if cfg.get("fill_stages") else micro_batch_layout(b, cfg["stages"])
        in_flight = m * lanes if cfg.get("fill_stages") else b

        def run(n: int, k: int = in_flight, m: int = m, lanes: int = lanes) -> tuple[float, float]:
            first: list[float] = []
            waited[0] = 0.0
            reqs = [Request(i, p, n) for i, p in enumerate(prompts(k, plen, model.arch.vocab_size))]
            hooks = SchedulerHooks(
                on_first_token=lambda dt: first.append(time.perf_counter()),
                on_wait=lambda dt: waited.__setitem__(0, waited[0] + dt),
            )
            t0, end = timed(reqs, m, lanes, hooks)
            return (max(first) - t0 if first else 0.0), end - (max(first) if first else t0)

        CompiledStage.of(model).warm_up(
            lanes,
            compile_cache.TileChoices.for_device(compile_cache_dir(), info.device)
            if info.device.type == "cuda" and options.triton_kernels
            else None,
        )
        run(4)  # warm-up
        prefill, decode = run(new)
        step = decode / (new - 1)
        results[str(b)] = {
            "ms_per_token": step * 1e3,
            "tokens_per_s": in_flight / step,
            "prefill_ms": prefill * 1e3,
            "micro_batches": m,
            "in_flight": in_flight,
            # stage 0 waiting for the last stage's tokens, over the decode time (0 on one stage)
            "stage0_wait_fraction": waited[0] / (prefill + decode),
        }
    if cfg.get("ttft_len"):
        # A cache of its own: decode reads up to the longest sequence only, but a separate allocation
        # keeps the decode rows above independent of this prompt's length.
        model.setup_cache(1, cfg["ttft_len"] + 1, dtype, info.device)
        times = []
        for _ in range(3):
            req = Request("ttft", prompts(1, cfg["ttft_len"], model.arch.vocab_size)[0], 1)
            t0, end = timed([req], 1, 1)
            times.append(end - t0)
        results["ttft_ms"] = min(times[1:]) * 1e3
    if info.rank == 0:
        Path(cfg["out"]).write_text(json.dumps(results))
    destroy_distributed()


def launch(cfg: dict[str, Any]) -> dict:
    world = cfg["stages"] * cfg["tp"]
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "worker"), env.get("PYTHONPATH", "")])
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank-worker", json.dumps(cfg)], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"layout {cfg['stages']}x{cfg['tp']} failed: exit codes {codes}")
    return dict(json.loads(Path(cfg["out"]).read_text()))


def weight_and_kv_bytes(
    model_dir: Path, dtype: torch.dtype, b: int, plen: int, new: int
) -> tuple[float, float]:
    cfg = json.loads((model_dir / "config.json").read_text())
    h, i, n_layers, v = (
        cfg["hidden_size"],
        cfg["intermediate_size"],
        cfg["num_hidden_layers"],
        cfg["vocab_size"],
    )
    kv_dim = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * (h // cfg["num_attention_heads"])
    per_layer = h * h * 2 + h * kv_dim * 2 + 3 * h * i  # q, o, k, v, gate, up, down
    elt = torch.tensor([], dtype=dtype).element_size()
    # Every step reads every layer and the LM head (the embedding is a gather: a few rows only).
    weights = (n_layers * per_layer + v * h) * elt
    context = plen + new / 2  # average context over the decode
    kv = b * n_layers * 2 * kv_dim * context * elt
    return weights, kv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-shape", default="llama2-7b", choices=list(SHAPES))
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--layouts", default="1x1,2x1,1x2", help="PxT list: stages x tensor-parallel")
    p.add_argument("--stages", type=int, default=None, help="run only this layout (with --tensor-parallel)")
    p.add_argument("--tensor-parallel", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"]
    )
    p.add_argument("--workdir", default="/tmp/conveyor-bench")
    p.add_argument("--out", default="benchmarks/results/generate.json")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument(
        "--ttft-prompt-len", type=int, default=0, help="also time the first token of one such prompt"
    )
    p.add_argument(
        "--fill-stages",
        action="store_true",
        help="P stages keep P micro-batches of --batch-sizes lanes each in flight (else the batch is split)",
    )
    p.add_argument(
        "--gpt-fast", default=None, help="a gpt-fast checkout: time it too (benchmarks/gpt_fast.py)"
    )
    p.add_argument("--rank-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_worker:
        rank_worker(json.loads(args.rank_worker))
        return
    dtype, device = DTYPES[args.dtype], args.device
    batches = [int(x) for x in args.batch_sizes.split(",")]
    layouts = (
        [(args.stages, args.tensor_parallel)]
        if args.stages
        else [tuple(int(v) for v in s.split("x")) for s in args.layouts.split(",")]
    )
    gpus = torch.cuda.device_count() if device == "cuda" else 64
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = build_checkpoint(args.model_shape, dtype, device, workdir)
    print(f"checkpoint {model_dir} ready in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    bw = measure_bandwidth(device)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", file=sys.stderr)
    report: dict[str, Any] = {
        "shape": args.model_shape,
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "bandwidth_bytes_per_s": bw,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "rows": [],
    }
    if not args.skip_hf:
        hf = bench_hf(
            model_dir, dtype, device, batches, args.prompt_len, args.new_tokens, args.ttft_prompt_len
        )
        if "ttft_ms" in hf:
            report["ttft"] = {"prompt_len": args.ttft_prompt_len, "HF generate (eager)": hf["ttft_ms"]}
        for b in batches:
            report["rows"].append(
                {"system": "HF generate (eager)", "layout": "1x1", "batch": b, **hf[str(b)]}
            )
    if args.gpt_fast:
        for b in batches:
            peer = [sys.executable, str(ROOT / "benchmarks" / "gpt_fast.py"), "--gpt-fast", args.gpt_fast]
            peer += [
                "--batch",
                str(b),
                "--prompt-len",
                str(args.prompt_len),
                "--new-tokens",
                str(args.new_tokens),
            ]
            out = subprocess.run(peer, check=True, stdout=subprocess.PIPE, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            report["rows"].append(
                {"system": "gpt-fast (reduce-overhead)", "layout": "1x1", "batch": b, **row}
            )
    for stages, tp in layouts:
        if stages * tp > gpus:
            print(f"skipping {stages}x{tp}: needs {stages * tp} GPUs, have {gpus}", file=sys.stderr)
            continue
        cfg = {
            "model": str(model_dir),
            "stages": stages,
            "tp": tp,
            "batches": batches,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "dtype": args.dtype,
            "device": device,
            "out": str(workdir / f"ours-{stages}x{tp}.json"),
            "ttft_len": args.ttft_prompt_len,
            "fill_stages": args.fill_stages,
        }
        ours = launch(cfg)
        if "ttft_ms" in ours:
            report.setdefault("ttft", {"prompt_len": args.ttft_prompt_len})[f"Conveyor {stages}x{tp}"] = ours[
                "ttft_ms"
            ]
        for b in batches:
            report["rows"].append(
                {"system": "Conveyor", "layout": f"{stages}x{tp}", "batch": b, **ours[str(b)]}
            )
    for row in report["rows"]:
        stages, tp = (int(v) for v in row["layout"].split("x"))
        in_flight = row.get("in_flight", row["batch"])
        weights, kv = weight_and_kv_bytes(model_dir, dtype, in_flight, args.prompt_len, args.new_tokens)
        m = row.get("micro_batches", 1)
        # A GPU reads its weight share once per micro-batch and its share of that micro-batch's KV cache;
        # a step (every sequence advances one token) takes max(m, P) such stage times: m micro-batches
        # pass through each GPU, and one micro-batch must cross all P stages before its next token.
        per_stage = (weights + kv / m) / (stages * tp)
        step = max(m, stages) * per_stage / bw
        row["roofline_ms"] = step * 1e3
        row["roofline_tokens_per_s"] = in_flight / step
        row["fraction_of_roofline"] = step * 1e3 / row["ms_per_token"]
    lines = [
        f"{args.model_shape}, {args.dtype}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy; "
        f"copy bandwidth {bw / 1e12:.2f} TB/s on {report['device']}",
        "",
        "| system | layout (PxT) | batch | in flight | decode ms/token | tokens/s | roofline ms | % of roofline |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['system']} | {r['layout']} | {r['batch']} | {r.get('in_flight', r['batch'])} | "
            f"{r['ms_per_token']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['roofline_ms']:.2f} | {100 * r['fraction_of_roofline']:.0f}% |"
        )
    for r in report["rows"]:
        if r.get("stage0_wait_fraction"):
            lines.append(
                f"{r['layout']} batch {r['batch']}: stage 0 waits {100 * r['stage0_wait_fraction']:.1f}% of the run"
            )
    if "ttft" in report:
        ttft = report["ttft"]
        lines.append(f"\ntime to first token, one {ttft['prompt_len']}-token prompt:")
        lines += [f"  {k}: {v:.1f} ms" for k, v in ttft.items() if k != "prompt_len"]
    print("\n".join(lines))
    save_report(report, args.out)


if __name__ == "__main__":
    main()
