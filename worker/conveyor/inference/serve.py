"""A serve replica's rank: ``run_rank(pod, local_rank)`` for ``mode: serve``, in a pod or under ``conveyor run``.

Every rank builds its stage with ``build_generation_rank`` (load, warm up), then the group meets at a
barrier: only then is every rank loaded and warm, and the entry rank (stage 0, tp 0) turns ready. The
entry rank runs the OpenAI-compatible HTTP server (openai_api.py, uvicorn in a thread, up from the
start so /health answers while the model loads) and the generation loop (the main thread):
``ServeEngine`` is the bridge, a bounded ``RequestQueue`` the HTTP handlers feed, and per request an
asyncio queue that the loop's hooks fill token by token. The other stages follow the items stage 0
sends, as in the batch job. SIGTERM closes the queue (a request still arriving gets 503): what is in
flight finishes, its responses are sent, the stages stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from conveyor import metrics
from conveyor.distributed import destroy_distributed, init_distributed
from conveyor.env import PodEnv
from conveyor.inference.http_connections import HEAD_SECONDS, SEND_SECONDS, bounded_h11, max_connections
from conveyor.inference.kernels.cuda_graphs import CompileOptions
from conveyor.inference.openai_requests import MAX_BODY_BYTES
from conveyor.inference.pipeline.generate import (
    ReplicatedQueue,
    Request,
    RequestQueue,
    Result,
    SchedulerHooks,
    micro_batch_layout,
)
from conveyor.inference.pipeline.sampling import SamplingParams
from conveyor.inference.rank_builder import DTYPES, build_generation_rank
from conveyor.log import get_logger
from conveyor.topology import Layout, Topology

log = get_logger(__name__)
MAX_POSITIONS = 4096  # KV positions per lane at most, whatever the model allows (memory: lanes x this)
WAITING_PER_LANE = 2  # the queue holds this many requests per lane; past that, 429
REQUEST_TIMEOUT_SECONDS = 600.0
# On stop, the HTTP server finishes sending the responses under way (their results are in) for this long.
HTTP_STOP_SECONDS = 10.0


class _Stream:
    """One request as the HTTP handler sees it: tokens, then its ``Result``, on the server's loop."""

    def __init__(self, request_id: str, prompt_ids: list[int], loop: asyncio.AbstractEventLoop):
        self.request_id, self.prompt_ids, self.loop = request_id, prompt_ids, loop
        self._items: asyncio.Queue[int | Result] = asyncio.Queue()
        self.arrived = time.perf_counter()
        self.last_token: float | None = None

    async def next(self) -> int | Result:
        return await self._items.get()

    def push(self, item: int | Result) -> None:  # from the generation thread
        with contextlib.suppress(RuntimeError):  # the server's loop closed (stopping): nobody listens
            self.loop.call_soon_threadsafe(self._items.put_nowait, item)


class ServeEngine:
    """What openai_api's app talks to; its hooks run in the generation loop's thread."""

    def __init__(
        self,
        job: str,
        model_name: str,
        tokenizer: Any,
        max_len: int,
        vocab_size: int,
        lanes: int,
        queue: RequestQueue,
        timeout: float = REQUEST_TIMEOUT_SECONDS,
    ):
        self.job, self.model_name, self.tokenizer, self.max_len = job, model_name, tokenizer, max_len
        self.vocab_size = vocab_size
        self.lanes, self.queue, self.timeout = lanes, queue, timeout
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._tokens, self._rate_since, self._rate_tokens = 0, time.perf_counter(), 0
        for series in (  # exported from the start (at 0), so an autoscaler never finds them missing
            metrics.SERVE_QUEUE_DEPTH,
            metrics.SERVE_RUNNING,
            metrics.SERVE_KV_CACHE_USAGE,
            metrics.SERVE_TOKENS_PER_SECOND,
            metrics.SERVE_TIME_TO_FIRST_TOKEN,
            metrics.SERVE_INTER_TOKEN_LATENCY,
            metrics.TOKENS_GENERATED,
            metrics.PROMPTS_COMPLETED,
        ):
            series.labels(job)

    # -- the HTTP side ------------------------------------------------------------------------------
    def ready(self) -> bool:
        return self._ready.is_set()

    def set_ready(self, ready: bool = True) -> None:
        self._ready.set() if ready else self._ready.clear()

    def submit(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        stop: tuple[str, ...],
        sampling: SamplingParams | None = None,
        seed: int | None = None,
        choice: int = 0,
    ) -> _Stream:
        stream = _Stream(uuid.uuid4().hex, prompt_ids, asyncio.get_running_loop())
        with self._lock:
            self._streams[stream.request_id] = stream
        # no seed: the request's id, drawn afresh; choice 0 draws as the same request with n = 1 does
        key = None if seed is None else ("seed", seed) if choice == 0 else ("seed", seed, choice)
        try:
            self.queue.put(Request(stream.request_id, prompt_ids, max_tokens, stop, sampling, key))
        except (RequestQueue.QueueFull, RequestQueue.Closed):
            with self._lock:
                del self._streams[stream.request_id]
            raise
        metrics.SERVE_QUEUE_DEPTH.labels(self.job).set(len(self.queue))
        metrics.PROMPT_TOKENS.labels(self.job).inc(len(prompt_ids))
        return stream

    def cancel(self, stream: Any) -> None:
        with self._lock:
            self._streams.pop(stream.request_id, None)
        self.queue.cancel(stream.request_id)

    def has_room(self, requests: int) -> bool:
        return len(self.queue) + requests <= self.queue.max_waiting

    def metrics(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

    def count(self, status: int) -> None:
        metrics.SERVE_REQUESTS.labels(self.job, str(status)).inc()

    # -- the generation loop's hooks ----------------------------------------------------------------
    def on_token(self, request: Request, token: int) -> None:
        with self._lock:
            stream = self._streams.get(request.id)
        self._tokens += 1
        metrics.TOKENS_GENERATED.labels(self.job).inc()
        if stream is None:  # cancelled
            return
        now = time.perf_counter()
        if stream.last_token is None:
            metrics.SERVE_TIME_TO_FIRST_TOKEN.labels(self.job).observe(now - stream.arrived)
        else:
            metrics.SERVE_INTER_TOKEN_LATENCY.labels(self.job).observe(now - stream.last_token)
        stream.last_token = now
        stream.push(token)

    def on_result(self, result: Result) -> None:
        with self._lock:
            stream = self._streams.pop(result.id, None)
        if result.finish_reason != "cancelled":
            metrics.PROMPTS_COMPLETED.labels(self.job).inc()
        if stream is not None:
            stream.push(result)

    def on_occupancy(self, running: int, positions: int) -> None:
        metrics.SERVE_RUNNING.labels(self.job).set(running)
        metrics.SERVE_QUEUE_DEPTH.labels(self.job).set(len(self.queue))
        metrics.SERVE_KV_CACHE_USAGE.labels(self.job).set(positions / (self.lanes * self.max_len))
        now = time.perf_counter()
        if running == 0 or now - self._rate_since >= 1.0:
            rate = (self._tokens - self._rate_tokens) / max(now - self._rate_since, 1e-9)
            metrics.SERVE_TOKENS_PER_SECOND.labels(self.job).set(rate if running else 0.0)
            self._rate_since, self._rate_tokens = now, self._tokens

    def hooks(self) -> SchedulerHooks:
        return SchedulerHooks(
            on_result=self.on_result, on_token=self.on_token, on_occupancy=self.on_occupancy
        )


@dataclass
class HttpServer:
    """uvicorn serving in its thread."""

    server: Any  # uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout: float = HTTP_STOP_SECONDS) -> None:
        """Stop listening, send the responses under way, then return. Why wait: the thread is a daemon and
        the rank's process exits next, which would cut a drained request's response off unsent."""
        self.server.should_exit = True
        self.thread.join(timeout + 1.0)


def start_http(
    app: Any,
    port: int,
    host: str = "0.0.0.0",
    admitted: int = 1,
    max_open: int | None = None,
    head_seconds: float = HEAD_SECONDS,
    send_seconds: float = SEND_SECONDS,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> HttpServer:
    """uvicorn in a daemon thread (it installs no signal handlers off the main thread), once it listens.
    A port it cannot bind is an error: a replica whose endpoint is not there must not turn ready.
    ``admitted``: the requests the replica takes at once (lanes and queue), which sizes the connections
    kept open (``max_open``, if not given; http_connections.py); ``max_body_bytes``: the largest body the
    app reads, which bounds a body on the wire."""
    import resource

    import uvicorn

    if max_open is None:
        max_open = max_connections(admitted, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=bounded_h11(max_open, head_seconds, send_seconds, max_body_bytes),
        timeout_keep_alive=max(1, round(head_seconds)),
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=int(HTTP_STOP_SECONDS),
    )
    server = uvicorn.Server(config)

    def run() -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits (its thread) when it cannot bind: see below
            server.run()

    thread = threading.Thread(target=run, name="openai-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        server.should_exit = True
        raise OSError(f"spec.serve.port: the endpoint could not listen on port {port} (taken?)")
    return HttpServer(server, thread)


def run_rank(
    pod: PodEnv,
    local_rank: int,
    *,
    port: int,
    host: str = "0.0.0.0",
    timeout: float = REQUEST_TIMEOUT_SECONDS,
) -> int:
    """``port``, ``host``: where the entry rank's HTTP endpoint listens; ``timeout``: seconds a request
    may take."""
    from conveyor.inference.job import load_tokenizer
    from conveyor.inference.model.families import load_arch
    from conveyor.inference.pipeline.generate import run_generation
    from conveyor.preflight_gate import wait_at_gate

    spec = pod.spec
    assert spec.serve is not None and spec.model is not None
    info = init_distributed(device=spec.device)
    wait_at_gate()  # nothing of the model is read before the pre-flight checks pass (preflight_gate.py)
    topo = Topology(Layout(1, pod.stages, pod.tensor_parallel))
    arch = load_arch(spec.model.path, pod.compile_cache_dir)
    max_len = min(arch.max_positions, MAX_POSITIONS)
    micro_batches, lanes_per_micro_batch = micro_batch_layout(
        spec.serve.max_batch_size, spec.parallelism.effective_micro_batches
    )
    lanes = micro_batches * lanes_per_micro_batch
    queue = RequestQueue(max_waiting=WAITING_PER_LANE * lanes)
    engine, server, tokenizer = None, None, None
    if topo.stage == 0:  # every stage-0 rank schedules: stop strings need the tokenizer on each
        tokenizer = load_tokenizer(spec.model.path, pod.compile_cache_dir)
    if topo.stage == 0 and topo.tp_rank == 0:
        if tokenizer is None:
            log.error(
                "serve mode needs a tokenizer in the model directory",
                extra={"field": "spec.model.path", "fix": "add tokenizer.json (or tokenizer_config.json)"},
            )
            return 2
        if getattr(tokenizer, "chat_template", None) is not None:
            # the chat path needs transformers' own tokenizer: loaded now, not on the first request
            tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        engine = ServeEngine(pod.job, pod.job, tokenizer, max_len, arch.vocab_size, lanes, queue, timeout)
        from conveyor.inference.openai_api import build_app

        try:
            server = start_http(build_app(engine), port, host, admitted=lanes + queue.max_waiting)
        except OSError as err:
            log.error("serve endpoint not started", extra={"field": "spec.serve.port", "error": str(err)})
            return 2
    rank = build_generation_rank(
        spec.model.path,
        topo,
        dtype=DTYPES[spec.model.dtype],
        device=info.device,
        micro_batches=micro_batches,
        lanes_per_micro_batch=lanes_per_micro_batch,
        max_len=max_len,
        options=CompileOptions.from_env(info.device),
        cache_dir=pod.compile_cache_dir,
        kv_cache_dtype=spec.model.kv_cache_dtype,
        on_phase=lambda name, seconds: metrics.WARMUP_SECONDS.labels(pod.job, name).set(seconds),
    )
    dist.barrier()  # why: the endpoint turns ready only once every rank of the group is loaded and warm
    metrics.READINESS.loaded()
    # The heap of the start (torch, the model, the tokenizer) is for good: out of the collector's sight, a
    # collection that a request's many objects (a body of 350,000 small arrays) set off scans only theirs,
    # not the whole heap again (0.41 s on the event loop, not 0.05 s). vLLM freezes its startup heap alike.
    gc.collect()
    gc.freeze()

    def stop(signum: int, _frame: object) -> None:
        log.info("stopping: finishing the requests in flight", extra={"signal": signum})
        if engine is not None:
            engine.set_ready(False)
        queue.close()  # stage 0 ends its loop and sends the stop item; the other stages end on it

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    if engine is not None:
        engine.set_ready()
        log.info(
            "serving",
            extra={
                "url": f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/v1",
                "model": pod.job,
                "lanes": lanes,
                "max_len": max_len,
                "kv_cache_dtype": spec.model.kv_cache_dtype,
            },
        )
    waiting: RequestQueue | ReplicatedQueue = queue
    if topo.stage == 0 and pod.tensor_parallel > 1:
        # the requests arrive at the entry rank; its tensor-parallel peers schedule on its answers
        assert topo.tensor_group is not None
        entry = dist.get_global_rank(topo.tensor_group, 0)
        waiting = ReplicatedQueue(queue if topo.tp_rank == 0 else None, topo.tensor_group, entry)
    run_generation(
        rank.model,
        rank.peers,
        SamplingParams(stop_token_ids=arch.eos_token_ids),  # greedy; the model's EOS stops, as HF's does
        waiting,
        micro_batches=micro_batches,
        lanes_per_micro_batch=lanes_per_micro_batch,
        device=info.device,
        tokenizer=tokenizer,
        hooks=engine.hooks() if engine is not None else None,
    )
    if server is not None:
        server.stop()  # every admitted request has its result: their responses go out before the exit
    if info.backend == "gloo":
        destroy_distributed()
    log.info("serve rank done")
    return 0
