"""Serve mode under load: throughput and latency percentiles at rising concurrency, against HF
``generate`` behind a simple server, in the same run.

Conveyor: ``conveyor run`` of a serve job (the same YAML as in a cluster), its OpenAI endpoint driven
by clients that each send streamed ``/v1/completions`` one after another. The baseline: the model in
HF, ``generate`` with a ``TextIteratorStreamer`` behind a Starlette server of the same API, one
request at a time (what a plain HF server does). Both get the same prompts (token ids, mixed lengths),
greedy, the same ``max_tokens``. Per request: time to the first streamed piece (TTFT), the time per
output token after it (TPOT, from the usage count in the last chunk), the whole request; per level:
output tokens per second over the wall time. A replica's start-up (``conveyor run`` to ``/ready``) is reported beside, cold (an empty compile
cache) and warm (the cache the cold start left).

    python3 benchmarks/serve.py --model-shape tiny --device cpu --stages 2 --concurrency 1,2,4,8
    python3 benchmarks/serve.py --model-shape llama2-7b --device cuda --concurrency 1,4,16,64
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "worker"), str(ROOT)]

import httpx  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import SHAPES, save_report  # noqa: E402
from benchmarks.generate import DTYPES, build_checkpoint  # noqa: E402


def with_tokenizer(model: Path, vocab: int) -> Path:
    """Streaming returns text: the random-weight checkpoint gets a byte-level tokenizer of its vocab."""
    if not (model / "tokenizer.json").exists():
        from conveyor.testing.tiny import build_tokenizer

        tokenizer = build_tokenizer(vocab)
        # BPE training on the small corpus stops short of a 32k vocabulary: the rest become added
        # tokens, so every id a random model emits streams as text (TTFT counts the first piece)
        tokenizer.add_tokens([f"<|{i}|>" for i in range(len(tokenizer), vocab)])
        tokenizer.save_pretrained(model)
    return model


def start_conveyor(
    model: Path, args: argparse.Namespace, port: int, cache: Path, log: Path
) -> tuple[Any, float]:
    """``conveyor run`` of the serve job; returns the process and the seconds until /ready answered."""
    job = {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "PipelineJob",
        "metadata": {"name": "bench-serve"},
        "spec": {
            "mode": "serve",
            "device": args.device,
            "model": {"path": str(model), "dtype": args.dtype},
            "parallelism": {"stages": args.stages},
            "resources": {"gpus": args.stages if args.device == "cuda" else 0},
            "serve": {"port": port, "maxBatchSize": args.max_batch_size},
        },
    }
    path = log.with_suffix(".yaml")
    path.write_text(json.dumps(job))  # YAML is a superset of JSON
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "run", str(path)],
        env={
            **os.environ,
            "CONVEYOR_COMPILE_CACHE": str(cache),
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT / "worker"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        },
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"conveyor run exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc, time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.25)


def stop_conveyor(proc: Any) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_hf_server(model: Path, args: argparse.Namespace, port: int) -> Any:
    """HF ``generate`` behind a Starlette server of the same streamed completions API, one request at a
    time (the lock): the baseline a user would write."""
    import transformers as T
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    tokenizer = T.AutoTokenizer.from_pretrained(model)
    hf = T.AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[args.dtype]).to(args.device).eval()
    lock = threading.Lock()

    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        streamer = T.TextIteratorStreamer(tokenizer, skip_prompt=True)

        generated: queue.Queue[int] = queue.Queue()

        def generate() -> None:
            with lock, torch.inference_mode():
                out = hf.generate(
                    torch.tensor([body["prompt"]], device=args.device),
                    max_new_tokens=body["max_tokens"],
                    do_sample=False,
                    streamer=streamer,
                    pad_token_id=0,
                )
            generated.put(out.shape[1] - len(body["prompt"]))

        threading.Thread(target=generate, daemon=True).start()

        async def events() -> Any:
            async for piece in iterate_in_threadpool(iter(streamer)):
                if piece:
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'text': piece}]})}\n\n"
            usage = {"completion_tokens": await run_in_threadpool(generated.get)}
            yield f"data: {json.dumps({'choices': [{'index': 0, 'text': ''}], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server


def served_model(url: str) -> str:
    return str(httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"])


def one_request(url: str, prompt: list[int], max_tokens: int, model: str = "bench") -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    sent, arrivals, tokens = time.monotonic(), [], 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        if response.is_error:
            raise SystemExit(f"{response.status_code} from {url}: {response.read().decode()}")
        for line in response.iter_lines():
            data = line.removeprefix("data: ")
            if data == line or data == "[DONE]":
                continue
            chunk = json.loads(data)
            if chunk["choices"][0].get("text"):
                arrivals.append(time.monotonic())
            tokens = chunk.get("usage", {}).get("completion_tokens", tokens)
    latency = time.monotonic() - sent
    ttft = arrivals[0] - sent if arrivals else None
    # time per output token after the first (vLLM's TPOT): streamed pieces are not tokens (a piece waits
    # for a whole UTF-8 character, HF's streamer for a whole word); the usage count is
    tpot = (latency - ttft) / (tokens - 1) if ttft is not None and tokens > 1 else None
    return {"ttft": ttft, "tpot": tpot, "tokens": tokens, "latency": latency}


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.5) * 1e3, "p90": pick(0.9) * 1e3, "p99": pick(0.99) * 1e3}


def load_level(
    url: str, prompts: list[list[int]], concurrency: int, max_tokens: int, model: str = "bench"
) -> dict[str, Any]:
    """``concurrency`` clients, each sending its share of ``prompts`` one after another."""
    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: one_request(url, p, max_tokens, model), prompts))
    wall = time.monotonic() - started
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "output_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_ms": percentiles([r["ttft"] for r in results if r["ttft"] is not None]),
        "tpot_ms": percentiles([r["tpot"] for r in results if r["tpot"] is not None]),
        "latency_ms": percentiles([r["latency"] for r in results]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-shape", default="tiny", choices=list(SHAPES))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--stages", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--prompt-lens", default="16,96", help="low,high: lengths drawn uniformly")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--workdir", default="/tmp/conveyor-bench")
    p.add_argument("--out", default="benchmarks/results/serve.json")
    args = p.parse_args()

    shape = SHAPES[args.model_shape]
    model = with_tokenizer(
        build_checkpoint(args.model_shape, DTYPES[args.dtype], args.device, Path(args.workdir)), shape.vocab
    )
    low, high = (int(x) for x in args.prompt_lens.split(","))
    rng = random.Random(0)
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = {
        c: [
            [rng.randrange(3, shape.vocab) for _ in range(rng.randint(low, high))]
            for _ in range(c * args.requests_per_client)
        ]
        for c in levels
    }
    from conveyor.utils import free_port

    report: dict[str, Any] = {
        "shape": args.model_shape,
        "device": args.device,
        "stages": args.stages,
        "max_tokens": args.max_tokens,
        "prompt_lens": [low, high],
        "startup_s": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "compile-cache"
        for run in ("cold", "warm"):  # the second start finds the first one's compile cache
            port = free_port()
            proc, seconds = start_conveyor(model, args, port, cache, Path(tmp) / f"serve-{run}.log")
            report["startup_s"][run] = seconds
            print(f"conveyor replica ready ({run} cache) in {seconds:.1f}s", flush=True)
            try:
                if run == "warm":
                    url = f"http://127.0.0.1:{port}"
                    name = served_model(url)
                    one_request(url, prompts[levels[0]][0], 4, name)  # the first request's costs stay out
                    report["conveyor"] = []
                    for c in levels:
                        report["conveyor"].append(load_level(url, prompts[c], c, args.max_tokens, name))
                        print("conveyor", json.dumps(report["conveyor"][-1]), flush=True)
            finally:  # a failed level must not leave a replica holding the GPU
                stop_conveyor(proc)
    if not args.skip_hf:
        port = free_port()
        server = start_hf_server(model, args, port)
        url = f"http://127.0.0.1:{port}"
        one_request(url, prompts[levels[0]][0], 4)
        report["hf"] = []
        for c in levels:
            report["hf"].append(load_level(url, prompts[c], c, args.max_tokens))
            print("hf", json.dumps(report["hf"][-1]), flush=True)
        server.should_exit = True
        for ours, theirs in zip(report["conveyor"], report["hf"], strict=True):
            ours["throughput_vs_hf"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    print("\n| system | concurrency | output tokens/s | TTFT p50/p99 ms | TPOT p50/p99 ms | vs HF |")
    print("| --- | --- | --- | --- | --- | --- |")
    for system in ("conveyor", "hf"):
        for row in report.get(system, []):
            ttft, itl = row["ttft_ms"], row["tpot_ms"]
            fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
            print(
                f"| {system} | {row['concurrency']} | {row['tokens_per_s']:.0f} | {fmt(ttft['p50'])}/"
                f"{fmt(ttft['p99'])} | {fmt(itl['p50'])}/{fmt(itl['p99'])} | "
                f"{row.get('throughput_vs_hf', 1.0):.2f}x |"
            )
    save_report(report, args.out)


if __name__ == "__main__":
    main()
