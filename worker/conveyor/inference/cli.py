"""``conveyor generate``: answer prompts with a HF model split over ``stages x tensor-parallel`` local
processes. The command starts the ranks itself (env:// on a free local port) under the supervisor of
``conveyor run`` (supervise.py: SIGTERM/SIGINT are forwarded to the ranks, the first rank that fails
stops the others and its exit code is the command's); each runs ``rank_main``. Rank 0 prints one JSON
line per prompt on stdout as it completes, and progress on stderr; the other ranks' stdout is dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from conveyor.supervise import Child, run_group
from conveyor.utils import free_port


def generate_main(args: argparse.Namespace) -> int:
    from conveyor.inference.generate_preflight import preflight_generate
    from conveyor.inference.validate import InputError
    from conveyor.paths import compile_cache_dir

    # Refuse bad flags, a bad model, layout or prompt here, once, before any process starts.
    try:
        preflight_generate(args, compile_cache_dir())
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    world = args.stages * args.tensor_parallel
    config = {k: getattr(args, k) for k in vars(args) if k not in ("func",)}
    port = free_port()
    children = []
    print(
        f"conveyor generate: starting {world} ranks ({args.stages} stages x {args.tensor_parallel} tp)",
        file=sys.stderr,
    )
    for rank in range(world):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )  # the supervisor adds CONVEYOR_PARENT_PID: the ranks die with this process
        if world > 1:
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
        children.append(
            Child(
                name=f"rank {rank}",
                argv=[sys.executable, "-m", "conveyor.inference.cli", json.dumps(config)],
                env=env,
                # stdout carries only rank 0's JSON lines; every rank's stderr (progress, errors) shows
                stdout=None if rank == 0 else subprocess.DEVNULL,
            )
        )
    outcome = run_group(children, grace_seconds=args.grace_seconds)
    if outcome.code:
        print(f"conveyor generate: {outcome.failed} exited with code {outcome.code}", file=sys.stderr)
    return outcome.code


def rank_main(config: dict[str, Any]) -> int:
    from conveyor.utils import die_with_parent

    die_with_parent()  # a rank never outlives `conveyor generate`

    from conveyor.distributed import destroy_distributed, init_distributed
    from conveyor.env import compile_cache_dir
    from conveyor.inference.job import load_tokenizer
    from conveyor.inference.kernels.cuda_graphs import CompileOptions
    from conveyor.inference.pipeline.generate import (
        Request,
        Result,
        SchedulerHooks,
        micro_batch_layout,
        run_generation,
    )
    from conveyor.inference.pipeline.sampling import SamplingParams
    from conveyor.inference.rank_builder import (
        DTYPES,
        PromptTooLongError,
        build_generation_rank,
        cache_length,
    )
    from conveyor.inference.validate import InputError
    from conveyor.topology import Layout, Topology

    info = init_distributed(device=config["device"])
    topo = Topology(Layout(1, config["stages"], config["tensor_parallel"]))
    model_dir = config["model"]
    tokenizer = load_tokenizer(model_dir, compile_cache_dir())
    if tokenizer is None:
        raise SystemExit(f"{model_dir} has no tokenizer (tokenizer.json): text prompts need one")
    prompts = [tokenizer(p)["input_ids"] for p in config["prompt"]]
    requests = [Request(i, ids, config["max_new_tokens"]) for i, ids in enumerate(prompts)]
    t0 = time.perf_counter()
    from conveyor.inference.model.families import load_arch

    arch = load_arch(model_dir, compile_cache_dir())
    try:
        max_len = cache_length(max(len(p) for p in prompts), config["max_new_tokens"], arch.max_positions)
    except PromptTooLongError as err:
        raise SystemExit(f"error: {err}") from None
    # a micro-batch per stage (so no stage waits), the prompts spread over them: their lanes may be more
    # than the prompts (3 prompts on 2 stages: 2 micro-batches of 2 lanes)
    micro_batches, lanes_per_micro_batch = micro_batch_layout(len(requests), topo.num_stages)
    try:
        rank = build_generation_rank(
            model_dir,
            topo,
            dtype=DTYPES[config["dtype"]],
            device=info.device,
            micro_batches=micro_batches,
            lanes_per_micro_batch=lanes_per_micro_batch,
            max_len=max_len,
            options=CompileOptions.from_env(info.device, compile_prompts=False),  # one-shot: see job.py
            cache_dir=compile_cache_dir(),
            quantization=config.get("quantize", "none"),
            kv_cache_dtype=config.get("kv_cache_dtype", "auto"),
        )
    except InputError as err:  # (the field's name is the spec's; the flag is --kv-cache-dtype)
        print(f"error: {err}", file=sys.stderr)
        return 2
    model, peers = rank.model, rank.peers
    say = info.rank == 0
    if say:
        quantized = f", {config['quantize']} weights" if config.get("quantize", "none") != "none" else ""
        if config.get("kv_cache_dtype", "auto") != "auto":
            quantized += f", {config['kv_cache_dtype']} KV cache"
        print(
            f"loaded and warmed up in {time.perf_counter() - t0:.1f}s on {info.device}{quantized} "
            f"({', '.join(f'{k} {v:.1f}s' for k, v in rank.seconds.items())})",
            file=sys.stderr,
            flush=True,
        )
    params = SamplingParams(
        temperature=config["temperature"],
        top_k=config["top_k"],
        top_p=config["top_p"],
        seed=config["seed"],
        stop_token_ids=arch.eos_token_ids,
    )
    generated = [0]

    def on_result(r: Result) -> None:
        generated[0] += len(r.output_ids)
        if say:
            row = {
                "prompt": config["prompt"][r.id],
                "text": r.text,
                "output_ids": r.output_ids,
                "finish_reason": r.finish_reason,
            }
            print(json.dumps(row), flush=True)

    t1 = time.perf_counter()
    run_generation(
        model,
        peers,
        params,
        requests,
        micro_batches=micro_batches,
        lanes_per_micro_batch=lanes_per_micro_batch,
        device=info.device,
        tokenizer=tokenizer,
        hooks=SchedulerHooks(on_result=on_result),
    )
    if say:
        dt = time.perf_counter() - t1
        print(
            f"generated {generated[0]} tokens in {dt:.2f}s ({generated[0] / dt:.1f} tokens/s)",
            file=sys.stderr,
        )
    destroy_distributed()
    return 0


if __name__ == "__main__":
    from conveyor.rank import exit_now

    # as a job's rank exits: the interpreter's teardown can abort a rank whose results are all out
    exit_now(rank_main(json.loads(sys.argv[1])))
