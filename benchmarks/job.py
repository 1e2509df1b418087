"""What a user runs, end to end: a batch inference job through ``conveyor run``, against HF ``generate``
on the same prompts in the same run.

The job is written as a user writes it (mixed prompt lengths as ``input_ids``, more prompts than lanes,
greedy) and run twice: cold (an empty compile cache) and warm (the cache the cold run left). Each run
is timed end to end (the ``conveyor run`` process) and by phase from the ranks' JSON logs: load, tune,
compile, capture (warm-up), worker start to the first decode, and generation; compiles and captures
after warm-up are counted from the warnings CompiledStage logs (must be 0).

Every timed process starts with the files it imports in the OS page cache (``--page-cache warm``, the
default): one untimed process imports what the ranks and HF import first. Otherwise the first run on a
fresh machine, ours, read torch's, Triton's and inductor's files from disk and HF's job after it found
them read (on an H100 host the cold run's import and compiler set-up took 3.96 and 7.0 s, the warm run's
1.31 and 1.8 s, and neither step reads the compile cache), so a "cold" run measured the machine's disk
as well as the empty compile cache. ``--page-cache cold``
leaves that out, for a first-run-on-a-machine figure.

HF, two ways. As a job: ``benchmarks/hf_job.py``, the same job written with transformers alone, run as a
fresh process and timed end to end like ``conveyor run`` (imports, load, generation, output), first
(cold) and again (warm: the files in the page cache); the ``speedup_vs_hf_job_*`` ratios compare whole
jobs. In this process: the model loaded, then left-padded batches of ``--batch-size`` in input order,
timed once after load (cold) and again (warm); ``speedup_vs_hf_cold`` takes its load and first pass,
``speedup_vs_hf_warm`` its second pass alone, against our whole job.

    python3 benchmarks/job.py --model-shape llama2-7b --prompts 256 --prompt-lens 32,255 \
        --new-tokens 128 --batch-size 64 --out benchmarks/results/job.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "worker"), str(ROOT)]

import torch  # noqa: E402

from benchmarks.common import SHAPES, save_report  # noqa: E402
from benchmarks.generate import DTYPES, build_checkpoint, sync  # noqa: E402

JOB = """apiVersion: conveyor.dev/v1alpha1
kind: PipelineJob
metadata:
  name: bench-job
spec:
  mode: inference
  device: {device}
  model:
    path: {model}
    dtype: {dtype}
    kvCacheDtype: {kv_cache_dtype}
  parallelism:
    stages: {stages}
    tensorParallel: {tensor_parallel}
    microBatches: {micro_batches}
  inference:
    input: {input}
    output: {output}
    maxNewTokens: {new}
    batchSize: {batch}
    sampling:
      temperature: 0.0
"""


def make_prompts(n: int, low: int, high: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(low, high))] for _ in range(n)]


def json_lines(text: str) -> list[dict[str, Any]]:
    rows = []
    for line in text.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            rows.append(json.loads(line[start:]))
        except ValueError:
            continue
    return rows


# What a rank (and the pre-flight, and HF's job) imports: read once, untimed, before any run
PAGE_CACHE_IMPORTS = (
    "import torch._inductor.compile_fx, triton, transformers\n"
    "from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer\n"
    "import conveyor.inference.job, conveyor.inference.rank_builder\n"
    "from conveyor.inference.kernels import decode_attention, skinny_matmul\n"
)


def warm_page_cache(device: str) -> float:
    """Import, in a process of its own, what the timed processes import; returns its seconds."""
    t0 = time.time()
    code = PAGE_CACHE_IMPORTS if device == "cuda" else PAGE_CACHE_IMPORTS.replace(", triton", "")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "worker"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return time.time() - t0


def run_job(job: Path, output: Path, cache: Path, label: str, log_name: str = "job") -> dict[str, Any]:
    """``label``: cold or warm, then optionally ``:NAME=VALUE,...`` set in the job's environment (a
    variant of the same run, e.g. ``warm:CONVEYOR_COMPILE_PROMPTS=0``)."""
    for stale in output.parent.glob(output.name + "*"):
        stale.unlink()
    _, _, variant = label.partition(":")
    env = {
        **os.environ,
        **dict(item.split("=", 1) for item in variant.split("+") if item),
        "CONVEYOR_COMPILE_CACHE": str(cache),
        "CONVEYOR_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        env.pop(name, None)  # the job's cache directory decides
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor", "run", str(job)], env=env, capture_output=True, text=True
    )
    wall = time.time() - t0
    if proc.returncode:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"{label}: conveyor run exited {proc.returncode}")
    logs = json_lines(proc.stdout + "\n" + proc.stderr)
    if os.environ.get("OUT"):  # the device tool's folder that comes back
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in label)
        Path(os.environ["OUT"], f"{log_name}-{safe}.log").write_text(proc.stdout + proc.stderr)

    def first(msg: str) -> dict[str, Any]:
        return next((r for r in logs if r.get("msg") == msg), {})

    warm, start, done = first("warm-up done"), first("inference starting"), first("inference complete")
    results = [json.loads(line) for line in output.read_text().splitlines()]
    tokens = sum(len(r["output_ids"]) for r in results)
    generation = done["ts"] - start["ts"]
    row = {
        "run": label,
        "wall_s": wall,
        "startup_s": start.get("startup_seconds", {}),
        "exit_s": logs[-1]["ts"] - done["ts"],  # generation done to the end of conveyor run
        "start_to_first_decode_s": start["ts"] - t0,  # process start to the generation loop
        "generation_s": generation,
        "output_tokens": tokens,
        "prompts": len(results),
        "tokens_per_s": tokens / generation,
        # the median decode step's output tokens a second: compare with generate.py's at this batch
        "decode_tokens_per_s": done.get("decode_tokens_per_second"),
        "job_tokens_per_s": tokens / wall,
        "compiles": warm.get("compiles"),
        "captures": warm.get("captures"),
        "late_compiles_or_captures": sum("after warm-up" in str(r.get("msg", "")) for r in logs),
    }
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def run_hf(
    model_dir: Path,
    dtype: torch.dtype,
    prompts: list[list[int]],
    new: list[int],
    batch: int,
    passes: int,
    device: str = "cuda",
) -> dict[str, Any]:
    """HF ``generate`` in this process; ``new``: each prompt's limit (a batch generates to its largest)."""
    import transformers as T

    from benchmarks.hf_job import generate_padded

    t0 = time.perf_counter()
    model = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    sync(device)
    load = time.perf_counter() - t0
    times, tokens = [], 0
    for _ in range(passes):
        sync(device)
        t1 = time.perf_counter()
        tokens = 0
        for i in range(0, len(prompts), batch):
            # rows that stopped early are padded: an upper bound
            out = generate_padded(model, prompts[i : i + batch], max(new[i : i + batch]), device)
            tokens += sum(min(n, out.shape[1]) for n in new[i : i + batch])
        sync(device)
        times.append(time.perf_counter() - t1)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"load_s": load, "pass_s": times, "output_tokens": tokens}


def run_hf_job(
    model_dir: Path, data: Path, output: Path, dtype: str, new: int, batch: int, device: str
) -> dict[str, Any]:
    """``benchmarks/hf_job.py`` in a fresh process: its wall time and the phases it reports."""
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "hf_job.py"), str(model_dir), str(data), str(output)]
        + ["--new-tokens", str(new), "--batch-size", str(batch), "--dtype", dtype, "--device", device],
        capture_output=True,
        text=True,
        # HF's cache grows by torch.cat a token at a time: at batch 256 on an 80 GB card it ran out of
        # memory with 22 GB reserved in freed pieces. Growable segments let it reuse them.
        env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", **os.environ},
    )
    wall = time.time() - t0
    if proc.returncode:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"hf_job.py exited {proc.returncode}")
    row = {"wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}
    print(json.dumps({"hf_job": row}), file=sys.stderr, flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-shape", default="llama2-7b", choices=list(SHAPES))
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--prompt-lens", default="32,255", help="low,high: lengths drawn uniformly")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument(
        "--new-tokens-spread",
        default=None,
        help="low,high: each prompt's own max_new_tokens drawn uniformly (sequences ending at different "
        "steps, as at their EOS); default: --new-tokens for all",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run (tests)")
    p.add_argument("--stages", type=int, default=1, help="pipeline stages, one GPU each")
    p.add_argument("--tensor-parallel", type=int, default=1)
    p.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        help="micro-batches of the batch: 2 lets the host's work on one overlap the GPU's on the other",
    )
    p.add_argument(
        "--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="spec.model.kvCacheDtype of the job"
    )
    p.add_argument("--hf-passes", type=int, default=2, help="0: no HF; 1: cold only; 2: cold and warm")
    p.add_argument(
        "--hf-job-runs", type=int, default=2, help="runs of hf_job.py, the HF job as a process: 0, 1 or 2"
    )
    p.add_argument(
        "--runs",
        default="cold,warm",
        help="cold: start from an empty compile cache; warm: the cache as it is; either followed by "
        "':NAME=VALUE+NAME=VALUE' runs with those set in the job's environment",
    )
    p.add_argument("--workdir", default="/tmp/conveyor-bench")
    p.add_argument(
        "--page-cache",
        default="warm",
        choices=["warm", "cold"],
        help="warm: the files every run imports are read once before any run is timed (module docstring)",
    )
    p.add_argument("--out", default="benchmarks/results/job.json")
    args = p.parse_args()
    dtype = DTYPES[args.dtype]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = build_checkpoint(args.model_shape, dtype, args.device, workdir)
    print(f"checkpoint {model_dir} ready in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    low, high = (int(v) for v in args.prompt_lens.split(","))
    prompts = make_prompts(args.prompts, low, high, SHAPES[args.model_shape].vocab)
    run_dir = workdir / "job"
    run_dir.mkdir(exist_ok=True)
    data = run_dir / "input.jsonl"
    limits = [args.new_tokens] * len(prompts)
    rows = [{"id": i, "input_ids": ids} for i, ids in enumerate(prompts)]
    if args.new_tokens_spread:
        lo, hi = (int(v) for v in args.new_tokens_spread.split(","))
        rng = random.Random(1)
        limits = [rng.randint(lo, hi) for _ in prompts]
        for row, limit in zip(rows, limits, strict=True):
            row["max_new_tokens"] = limit
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = run_dir / "out" / "results.jsonl"
    output.parent.mkdir(exist_ok=True)
    job = run_dir / "job.yaml"
    job.write_text(
        JOB.format(
            device=args.device,
            model=model_dir,
            dtype=args.dtype,
            kv_cache_dtype=args.kv_cache_dtype,
            input=data,
            output=output,
            new=max(limits),  # spec.inference.maxNewTokens: the most any row asks
            batch=args.batch_size,
            micro_batches=args.micro_batches,
            stages=args.stages,
            tensor_parallel=args.tensor_parallel,
        )
    )
    cache = workdir / "compile-cache"  # shared by the jobs of one workdir, as a fleet's volume is
    runs = args.runs.split(",")
    if any(run.partition(":")[0] == "cold" for run in runs):
        shutil.rmtree(cache, ignore_errors=True)
    prewarm = warm_page_cache(args.device) if args.page_cache == "warm" else None
    report: dict[str, Any] = {
        "shape": args.model_shape,
        "page_cache": args.page_cache,
        "page_cache_imports_s": prewarm,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "prompts": args.prompts,
        "prompt_lens": [low, high],
        "kv_cache_dtype": args.kv_cache_dtype,
        "new_tokens": args.new_tokens,
        "new_tokens_spread": args.new_tokens_spread,
        "batch_size": args.batch_size,
        "micro_batches": args.micro_batches,
        "stages": args.stages,
        "tensor_parallel": args.tensor_parallel,
        "runs": [run_job(job, output, cache, label, Path(args.out).stem) for label in runs],
    }
    if args.hf_job_runs:
        hf_out = run_dir / "out" / "hf-results.jsonl"
        hf_jobs = [
            run_hf_job(model_dir, data, hf_out, args.dtype, args.new_tokens, args.batch_size, args.device)
            for _ in range(args.hf_job_runs)
        ]
        report["hf_job"] = hf_jobs
        for row in report["runs"]:
            row["speedup_vs_hf_job_cold"] = hf_jobs[0]["wall_s"] / row["wall_s"]
            row["speedup_vs_hf_job_warm"] = hf_jobs[-1]["wall_s"] / row["wall_s"]
    if args.hf_passes:
        hf = run_hf(model_dir, dtype, prompts, limits, args.batch_size, args.hf_passes, args.device)
        report["hf"] = hf
        cold_hf = hf["load_s"] + hf["pass_s"][0]
        warm_hf = hf["pass_s"][-1]
        for row in report["runs"]:
            row["speedup_vs_hf_cold"] = cold_hf / row["wall_s"]
            row["speedup_vs_hf_warm"] = warm_hf / row["wall_s"]
    save_report(report, args.out)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
