"""Pipeline-parallel fine-tuning speed: a ``mode: train`` PipelineJob through ``conveyor run``, next to
DeepSpeed's pipeline engine on the same model, batch and GPUs in the same run.

    python3 benchmarks/train_pipeline.py --model-shape llama2-7b --stages 2 --global-batch-size 16 \\
        --out $OUT/train_pp2.json

Ours is what a user runs: a random-weight HF checkpoint of the shape (built once under --workdir), a JSONL
of random ``input_ids``, and a job with ``spec.train`` (bf16 with fp32 master weights, AdamW, clipping at
1.0) run by ``python -m conveyor run``; the step times come from rank 0's JSON progress log, the first
--warmup-steps left out. On the GPU (or with --stop-after-steps) the job asks for one step more and is
stopped (SIGTERM: what Ctrl-C does) once the timed steps are logged, so the end-of-run checkpoint and
export of a 7B model (~100 GB of optimizer state) are not written; otherwise it runs to its end.

DeepSpeed's side: ``deepspeed.pipe.PipelineModule`` over HF's own Llama layers (embedding, one
``LlamaDecoderLayer`` per layer with HF's rotary table, final norm + LM head, the same loss), one process
per GPU started here, ``deepspeed.initialize`` with the same micro-batch, gradient accumulation
(micro-batches per step), bf16, clipping and a client ``torch.optim.AdamW`` (no op to JIT-build), ZeRO
stage --deepspeed-zero-stage; ``engine.train_batch`` timed over the same steps. DeepSpeed's pipeline has
no tensor parallelism of its own: at --tensor-parallel T it runs the stages x T data-parallel replicas on
the same GPUs and the same tokens per step (said in the report).

tokens/s = tokens per step / mean step time; MFU = tokens/s x FLOPs per token / (peak bf16 FLOP/s x GPUs),
FLOPs per token as train/progress.py counts them (6 x parameters + the attention term, recomputed
activations not counted). Peak memory per GPU: the most ``nvidia-smi`` saw in use during each side's run
(and DeepSpeed's ``torch.cuda.max_memory_allocated``). A side that fails is reported with its error.

``--device cpu`` (tiny shape, gloo, fp32) runs both sides on the CPU in a minute: a smoke test, not a figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "worker"), str(ROOT)]

import torch  # noqa: E402 (after the path setup)

from benchmarks.common import SHAPES, save_report  # noqa: E402
from benchmarks.ranks import layout, run_group, tail  # noqa: E402

# every child: NVLink multicast off (the GPU machines' rule: NCCL's NVLS and symmetric memory use it)
CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
LR, CLIP = 1e-5, 1.0

JOB = """apiVersion: conveyor.dev/v1alpha1
kind: PipelineJob
metadata:
  name: bench-train
spec:
  mode: train
  device: {device}
  model:
    path: {model}
    dtype: {dtype}
  parallelism:
    stages: {stages}
    tensorParallel: {tensor_parallel}
  checkpoint:
    path: {checkpoint}
    every: 1000000
    keep: 1
  train:
    dataset: {dataset}
    seqLength: {seq}
    steps: {steps}
    microBatchSize: {micro}
    globalBatchSize: {global_batch}
    optimizer:
      type: AdamW
      params: {{lr: {lr:.8f}}}
    gradientClipping: {clip}
    precision: {precision}
    activationCheckpointing: {ac}
    export: {export}
"""


def write_dataset(path: Path, samples: int, seq: int, vocab: int) -> Path:
    """``samples`` documents of ``seq - 1`` random token ids: packed with EOS after each, one a sample."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(samples):
            f.write(json.dumps({"input_ids": [rng.randrange(3, vocab) for _ in range(seq - 1)]}) + "\n")
    return path


class MemorySampler:
    """The most memory ``nvidia-smi`` reports in use on each GPU while running (the whole process's:
    allocator cache and CUDA context included, the same for both sides)."""

    def __init__(self, device: str, interval: float = 0.5):
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._enabled = device == "cuda" and shutil.which("nvidia-smi") is not None

    def _run(self, interval: float) -> None:
        query = ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.TimeoutExpired):
                out = ""
            for line in out.splitlines():
                index, used = (int(v) for v in line.split(","))
                self.peak[index] = max(self.peak.get(index, 0), used * 2**20)
            self._stop.wait(interval)

    def __enter__(self) -> MemorySampler:
        if self._enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._enabled:
            self._thread.join()

    def gib(self, gpus: int) -> list[float]:
        return [round(self.peak.get(i, 0) / 2**30, 2) for i in range(gpus)]


def summary(step_seconds: list[float], tokens_per_step: int, flops_per_token: float, params: int, peak: float | None, gpus: int) -> dict[str, Any]:  # fmt: skip
    mean = sum(step_seconds) / len(step_seconds)
    tokens_per_s = tokens_per_step / mean
    return {
        "step_seconds": [round(s, 4) for s in step_seconds],
        "mean_step_s": round(mean, 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(tokens_per_s * flops_per_token / (peak * gpus), 4) if peak else None,
        # without the attention term: the 6N figure most reports quote
        "mfu_6n": round(tokens_per_s * 6 * params / (peak * gpus), 4) if peak else None,
    }


def checkpoint_in_child(shape: str, dtype: torch.dtype, device: str, workdir: Path) -> Path:
    """benchmarks/generate.py's random checkpoint, built in a child process: built here, the 7B model's
    memory stayed in this process's CUDA cache on GPU 0 through both sides' runs."""
    code = (
        "import sys, torch; sys.path[:0] = sys.argv[1:3]; from benchmarks.generate import build_checkpoint; "
        "print(build_checkpoint(sys.argv[3], getattr(torch, sys.argv[4]), sys.argv[5], __import__('pathlib').Path(sys.argv[6])))"
    )
    argv = [str(ROOT / "worker"), str(ROOT), shape, str(dtype).removeprefix("torch."), device, str(workdir)]
    out = subprocess.run([sys.executable, "-c", code, *argv], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def gpu_name() -> str:
    """GPU 0's name from nvidia-smi: torch.cuda would hold a CUDA context on GPU 0 in this process."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"]
        return subprocess.run(query, check=True, capture_output=True, text=True).stdout.strip()
    return torch.cuda.get_device_name()


def last_error(log_path: Path) -> str:
    """The last error record's message in a JSON log, else the log's tail."""
    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        start = line.find("{")
        if start >= 0 and '"error"' in line:
            with contextlib.suppress(ValueError):
                return str(json.loads(line[start:]).get("msg"))
    return tail(log_path, 1500)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


# ---- ours: a PipelineJob through conveyor run ----------------------------------------------------------
def run_ours(cfg: dict[str, Any], workdir: Path, timeout: float) -> dict[str, Any]:
    """Run the job until its last step is logged; the timed steps' seconds from rank 0's progress log."""
    run_dir = workdir / "conveyor"
    shutil.rmtree(run_dir, ignore_errors=True)  # a checkpoint left here would be resumed
    run_dir.mkdir(parents=True)
    total = cfg["warmup"] + cfg["steps"]
    # stopping: one step more than timed, so that the stop lands inside a step, before the last step's
    # checkpoint has begun
    steps_in_job = total + 1 if cfg["stop_after_steps"] else total
    job = run_dir / "job.yaml"
    job.write_text(
        JOB.format(
            device=cfg["device"], model=cfg["model"], dtype=cfg["dtype"], stages=cfg["stages"],
            tensor_parallel=cfg["tp"], checkpoint=run_dir / "ckpt", dataset=cfg["dataset"], seq=cfg["seq"],
            steps=steps_in_job, micro=cfg["micro"], global_batch=cfg["global_batch"], lr=LR, clip=CLIP,
            precision=cfg["precision"], ac=str(cfg["activation_checkpointing"]).lower(), export=run_dir / "export",
        )
    )  # fmt: skip
    env = {
        **os.environ,
        **CHILD_ENV,
        "CONVEYOR_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
        # as DeepSpeed's ranks get (ranks.py): on a shared CPU, ranks of several threads each stalled
        # each other (tiny model, 2 stages, 8 micro-batches: steps of 0.17-1.8 s, 0.05-0.06 s with one thread)
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "worker"), os.environ.get("PYTHONPATH", "")]),
    }
    log_path = run_dir / "conveyor-run.log"
    steps: dict[int, dict[str, Any]] = {}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "run", str(job)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        timer = threading.Timer(timeout, _kill_group, args=(proc.pid,))
        timer.start()
        stopped = False
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            start = line.find("{")
            if start < 0 or '"fine-tune step"' not in line:
                continue
            record = json.loads(line[start:])
            steps[int(record["step"])] = record
            if len(steps) >= total and cfg["stop_after_steps"] and not stopped:
                proc.send_signal(signal.SIGTERM)  # as Ctrl-C: no end-of-run checkpoint, no export
                stopped = True
        code = proc.wait()
        timer.cancel()
    shutil.rmtree(run_dir / "ckpt", ignore_errors=True)  # a 7B's optimizer state: ~100 GB of disk
    wall = time.perf_counter() - t0
    ours: dict[str, Any] = {"log": str(log_path), "wall_s": round(wall, 1), "exit_code": code}
    timed = [steps[s]["step_seconds"] for s in range(cfg["warmup"] + 1, total + 1) if s in steps]
    if len(timed) < cfg["steps"]:
        why = f"timed out after {timeout:.0f}s" if wall >= timeout else f"conveyor run exited {code}"
        ours["status"] = f"{why} after {len(steps)} of {total} steps: {last_error(log_path)}"
        return ours
    ours["status"] = "ok" if code == 0 or stopped else f"steps logged, then conveyor run exited {code}"
    ours["stopped_after_steps"] = stopped
    ours["losses"] = [steps[s]["loss"] for s in sorted(steps)]
    ours["mfu_logged"] = [steps[s]["mfu"] for s in range(cfg["warmup"] + 1, total + 1)]
    ours["step_seconds"] = timed
    return ours


# ---- DeepSpeed: its pipeline engine over HF's layers, one process per rank ----------------------------
def deepspeed_rank(cfg: dict[str, Any]) -> None:
    """One rank of DeepSpeed's side; writes its step times and peak memory to cfg['out'].rank{R}."""
    import deepspeed
    import transformers as T
    from conveyor.train.data import DataOrder, read_samples
    from conveyor.train.hf_layers import causal_lm_loss
    from deepspeed.pipe import LayerSpec, PipelineModule
    from torch import nn
    from transformers.models.llama import modeling_llama as llama

    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    cuda = cfg["device"] == "cuda"
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    config = T.AutoConfig.from_pretrained(cfg["model"])
    config._attn_implementation = "sdpa"  # flash attention through SDPA, as ours

    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.embed_tokens(ids)  # [n, S] -> [n, S, hidden]

    class Decoder(nn.Module):
        def __init__(self, index: int) -> None:
            super().__init__()
            self.layer = llama.LlamaDecoderLayer(config, index)
            self.rotary = llama.LlamaRotaryEmbedding(config)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(x.shape[1], device=x.device)[None]  # [1, S]
            rope = self.rotary(x, positions)
            # no mask: SDPA's causal path
            out = self.layer(x, attention_mask=None, position_ids=positions, position_embeddings=rope)
            return out[0] if isinstance(out, tuple) else out  # transformers 4.x returned a tuple

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = llama.LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lm_head(self.norm(x))  # [n, S, vocab]

    specs = [
        LayerSpec(Embed),
        *(LayerSpec(Decoder, i) for i in range(config.num_hidden_layers)),
        LayerSpec(Head),
    ]
    torch.manual_seed(0)
    with torch.device(device):  # built on this rank's GPU: a 7B's layers initialised on the CPU took minutes
        module = PipelineModule(
            specs,
            num_stages=cfg["stages"],
            loss_fn=causal_lm_loss,
            partition_method="parameters",
            activation_checkpoint_interval=1 if cfg["activation_checkpointing"] else 0,
            # the decoder layers only: a checkpointed embedding's output (from token ids) has no grad_fn
            checkpointable_layers=["Decoder"],
        )
    load_hf_weights(module, cfg["model"], config.num_hidden_layers, device)
    replicas = cfg["ds_replicas"]
    ds_config = {
        "train_batch_size": cfg["global_batch"],
        "train_micro_batch_size_per_gpu": cfg["micro"],
        "gradient_accumulation_steps": cfg["global_batch"] // (cfg["micro"] * replicas),
        "bf16": {"enabled": cfg["precision"] == "bf16"},
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": cfg["zero_stage"]},
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.AdamW(module.parameters(), lr=LR)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    # our job's samples in our job's order (data.py): this replica's share of each step's global batch
    samples = read_samples(cfg["dataset"], cfg["seq"], True, None, cfg["eos"], 0, config.vocab_size)
    order = DataOrder(samples, 0, cfg["global_batch"], replicas, cfg["micro"])
    replica = engine.grid.data_parallel_id
    seconds, losses = [], []
    for step in range(cfg["warmup"] + cfg["steps"]):
        data = iter(order.micro_batches(step * cfg["global_batch"], replica))
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = engine.train_batch(data_iter=data)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        losses.append(float(loss))
    result = {
        "rank": rank,
        "stage": engine.stage_id,
        "step_seconds": seconds[cfg["warmup"] :],
        "losses": losses,
        "max_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "max_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "deepspeed_optimizer": type(engine.optimizer).__name__,
    }
    Path(f"{cfg['out']}.rank{rank}").write_text(json.dumps(result))


def load_hf_weights(module: Any, model_dir: str, layers: int, device: torch.device) -> None:
    """Fill this stage's layers from the HF checkpoint (global index 0: embedding, 1..L: decoder layer
    i - 1, L + 1: norm and head): both sides start from the same weights; strict: names and shapes checked."""
    from safetensors import safe_open

    prefixes = {}
    for name in module._modules:
        if not name.isdigit():
            continue
        index = int(name)
        prefixes[name] = (
            {"embed_tokens.": "model.embed_tokens."} if index == 0
            else {"norm.": "model.norm.", "lm_head.": "lm_head."} if index == layers + 1
            else {"layer.": f"model.layers.{index - 1}."}
        )  # fmt: skip
    wanted = {hf: (name, ours) for name, p in prefixes.items() for ours, hf in p.items()}
    states: dict[str, dict[str, torch.Tensor]] = {name: {} for name in prefixes}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt", device=str(device)) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                hit = next((hf for hf in wanted if key.startswith(hf)), None)
                if hit is not None:
                    name, ours = wanted[hit]
                    states[name][ours + key.removeprefix(hit)] = f.get_tensor(key)
    for name, state in states.items():
        module._modules[name].load_state_dict(state, strict=True)


def run_deepspeed(cfg: dict[str, Any], workdir: Path, timeout: float) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return {"status": "skipped: deepspeed not importable"}
    run_dir = workdir / "deepspeed"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    world = cfg["stages"] * cfg["ds_replicas"]
    cfg = {**cfg, "out": str(run_dir / "result.json")}
    lay = layout(world, cfg["device"])
    t0 = time.perf_counter()
    group = run_group(
        [__file__, "--deepspeed-rank", json.dumps(cfg)], lay, run_dir, "ds", timeout, env=CHILD_ENV
    )
    failure = group.failure(timeout)
    out: dict[str, Any] = {"wall_s": round(time.perf_counter() - t0, 1), "logs": [str(p) for p in group.logs]}
    if failure:
        return {**out, "status": failure}
    ranks = [json.loads(Path(f"{cfg['out']}.rank{r}").read_text()) for r in range(world)]
    # a step ends when its last rank's train_batch returns
    seconds = [max(r["step_seconds"][i] for r in ranks) for i in range(cfg["steps"])]
    return {**out, "status": "ok", "step_seconds": seconds, "losses": ranks[0]["losses"], "ranks": ranks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-shape", default=None, choices=list(SHAPES), help="default: llama2-7b (cpu: tiny)")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--tensor-parallel", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=None, help="default: 2048 (cpu: 64)")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument(
        "--global-batch-size", type=int, default=8,
        help="sequences per optimizer step; / micro-batch size = micro-batches in flight per step",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=10, help="timed steps, after the warm-up steps")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--engines", default="conveyor,deepspeed")
    p.add_argument("--deepspeed-zero-stage", type=int, default=0, choices=[0, 1])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--timeout", type=float, default=540, help="seconds for each side's run")
    p.add_argument("--workdir", default="/tmp/conveyor-bench")
    p.add_argument("--out", default="benchmarks/results/train_pipeline.json")
    p.add_argument(
        "--stop-after-steps",
        action="store_true",
        help="stop our job after its timed steps (always on the GPU)",
    )
    p.add_argument("--deepspeed-rank", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.deepspeed_rank:
        deepspeed_rank(json.loads(args.deepspeed_rank))
        return
    cuda = args.device == "cuda"
    shape = args.model_shape or ("llama2-7b" if cuda else "tiny")
    seq = args.seq_length or (2048 if cuda else 64)
    world = args.stages * args.tensor_parallel
    gpus = torch.cuda.device_count() if cuda else 0
    if cuda and gpus < world:
        message = (
            f"skipped: {args.stages} stages x {args.tensor_parallel} tensor-parallel need {world} GPUs, "
            f"this machine has {gpus} (use --device cpu for the smoke test)"
        )
        print(message, file=sys.stderr)
        save_report({"status": message}, args.out)
        return
    if args.global_batch_size % args.micro_batch_size:
        raise SystemExit(
            f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size"
        )
    ds_replicas = (
        args.tensor_parallel
    )  # DeepSpeed's pipeline has no TP: the same GPUs as data-parallel replicas
    if args.global_batch_size % (args.micro_batch_size * ds_replicas):
        raise SystemExit(
            f"--global-batch-size must be a multiple of micro-batch x {ds_replicas} for DeepSpeed"
        )
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.perf_counter()
    model = checkpoint_in_child(shape, dtype, args.device, workdir)
    print(f"checkpoint {model} ready in {time.perf_counter() - t0:.0f}s", file=sys.stderr)

    from conveyor.inference.model.families import load_arch
    from conveyor.train.hf_layers import parameter_count
    from conveyor.train.progress import PEAK_FLOPS, flops_per_token

    arch = load_arch(str(model))
    params = parameter_count(arch)
    per_token = flops_per_token(arch, params, seq)
    name = gpu_name() if cuda else "cpu"
    peak = (
        next((bf16 for fragment, (bf16, _) in PEAK_FLOPS.items() if fragment in name), None) if cuda else None
    )
    dataset = write_dataset(
        workdir / f"train-{shape}-{seq}.jsonl", 2 * args.global_batch_size, seq, arch.vocab_size
    )
    cfg = {
        "device": args.device, "model": str(model), "dtype": str(dtype).removeprefix("torch."),
        "stages": args.stages, "tp": args.tensor_parallel, "ds_replicas": ds_replicas, "dataset": str(dataset),
        "seq": seq, "micro": args.micro_batch_size, "global_batch": args.global_batch_size,
        "warmup": args.warmup_steps, "steps": args.steps, "precision": "bf16" if cuda else "fp32",
        "activation_checkpointing": args.activation_checkpointing, "zero_stage": args.deepspeed_zero_stage,
        "stop_after_steps": cuda or args.stop_after_steps,
        "eos": arch.eos_token_ids[0] if arch.eos_token_ids else None,
    }  # fmt: skip
    tokens_per_step = args.global_batch_size * seq
    report: dict[str, Any] = {
        "shape": shape,
        "device": name,
        "gpus": world,
        "parameters": params,
        "flops_per_token": per_token,
        "peak_flops_per_gpu": peak,
        "seq_length": seq,
        "micro_batch_size": args.micro_batch_size,
        "global_batch_size": args.global_batch_size,
        "micro_batches": args.global_batch_size // args.micro_batch_size,
        "tokens_per_step": tokens_per_step,
        "warmup_steps": args.warmup_steps,
        "timed_steps": args.steps,
        "activation_checkpointing": args.activation_checkpointing,
        "precision": cfg["precision"] + (" (fp32 master weights)" if cuda else ""),
        "layouts": {
            "conveyor": f"{args.stages} stages x {args.tensor_parallel} tensor-parallel",
            "deepspeed": f"{args.stages} stages x {ds_replicas} data-parallel, ZeRO {args.deepspeed_zero_stage}",
        },
    }
    engines = args.engines.split(",")
    for engine, run in (("conveyor", run_ours), ("deepspeed", run_deepspeed)):
        if engine not in engines:
            continue
        with MemorySampler(args.device) as memory:
            result = run(cfg, workdir, args.timeout)
        if result.get("status") == "ok":
            result.update(summary(result["step_seconds"], tokens_per_step, per_token, params, peak, world))
        if cuda:
            result["peak_gpu_memory_gib"] = memory.gib(world)
        report[engine] = result
        print(f"{engine}: {json.dumps({k: v for k, v in result.items() if k not in ('ranks', 'losses')})}", file=sys.stderr)  # fmt: skip
    ours, theirs = report.get("conveyor", {}), report.get("deepspeed", {})
    if ours.get("status") == theirs.get("status") == "ok":
        report["tokens_per_s_ratio_conveyor_over_deepspeed"] = round(
            ours["tokens_per_s"] / theirs["tokens_per_s"], 3
        )
        # the same weights and samples in the same order: the first losses agree (to bf16's rounding),
        # evidence that both sides train the same model on the same batch
        first = (ours["losses"][0], theirs["losses"][0])
        report["loss_step1"] = {
            "conveyor": first[0],
            "deepspeed": first[1],
            "rel_diff": abs(first[0] - first[1]) / abs(first[1]),
        }
    lines = [
        f"{shape}, seq {seq}, {report['micro_batches']} micro-batches of {args.micro_batch_size} a step, "
        f"{report['precision']}, {world} x {name}",
        "",
        "| engine | layout | tokens/s | MFU | step s | peak GPU memory (GiB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for engine in ("conveyor", "deepspeed"):
        r = report.get(engine)
        if r is None:
            continue
        if r.get("status") != "ok":
            status = " ".join(r["status"].split())[:300]
            lines.append(f"| {engine} | {report['layouts'][engine]} | {status} | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(
            f"| {engine} | {report['layouts'][engine]} | {r['tokens_per_s']:.0f} | {mfu} | {r['mean_step_s']:.3f} "
            f"| {r.get('peak_gpu_memory_gib', '-')} |"
        )
    if "tokens_per_s_ratio_conveyor_over_deepspeed" in report:
        lines.append(
            f"\nConveyor / DeepSpeed tokens/s: {report['tokens_per_s_ratio_conveyor_over_deepspeed']:.2f}"
        )
    if "loss_step1" in report:
        lines.append(f"step 1 loss: Conveyor {first[0]:.5f}, DeepSpeed {first[1]:.5f}")
    report["table"] = "\n".join(lines)
    print(report["table"])
    save_report(report, args.out)


if __name__ == "__main__":
    main()
