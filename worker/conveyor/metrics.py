"""Worker metrics (Prometheus, prefix ``conveyor_``), names as in docs/design.md, and readiness.

Every worker process serves them on ``metrics_port + local_rank`` (one port per process, so T ranks in a
pod never collide); ``conveyor run`` offsets ports per pod the same way. The same server answers
``/ready``: 503 until the rank can do its work (it joined its process group and, in a mode that loads a
model, loaded its shard), 200 after; the pod's readiness probe asks local rank 0's. The port is open long
before that (a model takes minutes to load), which is why a TCP probe cannot tell.

A ``spec.train.command`` program is a child of its rank with a registry of its own: its engine writes
its ``conveyor_`` families to the file named by ``CONVEYOR_METRICS_FILE`` (``export_to_rank``, at most
once a second and at exit), and the rank serves them merged into its own, one family per name
(``ChildMetrics``): node_exporter's textfile collector, for one child.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)
from prometheus_client.metrics_core import Metric

# OpenMetrics round-trips a registry's families (a counter's _created stays in its family; the
# Prometheus text format splits it into a family of its own)
from prometheus_client.openmetrics.exposition import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from conveyor.watchdog import PROGRESS, Progress

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

TOKENS_GENERATED = Counter("conveyor_tokens_generated", "Tokens generated (output tokens).", ["job"])
PROMPT_TOKENS = Counter("conveyor_prompt_tokens", "Prompt tokens processed by prefill.", ["job"])
PROMPTS_COMPLETED = Counter("conveyor_prompts_completed", "Prompts whose results were committed.", ["job"])
TIME_TO_FIRST_TOKEN = Histogram(
    "conveyor_time_to_first_token_seconds",
    "Time from a batch's start to its first token.",
    ["job"],
    buckets=_LATENCY_BUCKETS,
)
TOKEN_LATENCY = Histogram(
    "conveyor_token_latency_seconds",
    "Time per decode step (one token for every sequence).",
    ["job"],
    buckets=_LATENCY_BUCKETS,
)
BUBBLE_SECONDS = Counter(
    "conveyor_pipeline_bubble_seconds", "Time a stage waited on its neighbours.", ["job", "stage"]
)
STEP_SECONDS = Histogram(
    "conveyor_step_seconds", "Training step (one batch) time.", ["job"], buckets=_STEP_BUCKETS
)
LOSS = Gauge("conveyor_loss", "Mean loss of the last training batch.", ["job"])
TRAIN_STEP = Gauge("conveyor_train_step", "Optimizer steps completed.", ["job"])
TRAIN_TOKENS_PER_SECOND = Gauge(
    "conveyor_train_tokens_per_second",
    "Tokens trained per second over the last step (all replicas).",
    ["job"],
)
TRAIN_MFU = Gauge(
    "conveyor_train_mfu_ratio",
    "Model FLOPs utilisation of the last step: 6N + attention FLOPs per token / the GPUs' peak (GPUs only).",
    ["job"],
)
GPU_MEMORY_BYTES = Gauge(
    "conveyor_gpu_memory_bytes", "GPU memory allocated by this process.", ["job", "rank"]
)
CHECKPOINT_SECONDS = Histogram(
    "conveyor_checkpoint_duration_seconds",
    "Time to write and commit a checkpoint.",
    ["job"],
    buckets=_STEP_BUCKETS,
)
LAST_CHECKPOINT_STEP = Gauge(
    "conveyor_last_checkpoint_step", "Step of the last committed checkpoint.", ["job"]
)
LAST_CHECKPOINT_TIME = Gauge(
    "conveyor_last_checkpoint_timestamp_seconds", "Unix time of the last committed checkpoint.", ["job"]
)
CHECKPOINTS_SKIPPED = Gauge(
    "conveyor_checkpoints_skipped",
    "Checkpoints a resume skipped as partial or corrupt, over the job's life (its checkpoint volume's record).",
    ["job"],
)
LAST_SKIPPED_STEP = Gauge(
    "conveyor_checkpoint_last_skipped_step",
    "Step of the newest checkpoint a resume skipped as partial or corrupt; the reason label says why.",
    ["job", "checkpoint", "reason"],
)
WARMUP_SECONDS = Gauge(
    "conveyor_warmup_seconds",
    "Start-up time by phase (load, tune, compile, capture), until the rank is ready.",
    ["job", "phase"],
)
COMPILES = Counter(
    "conveyor_compiles",
    "Graphs compiled and CUDA graphs captured (when: warm_up, or late: after warm-up, which should be 0).",
    ["job", "what", "when"],
)

# Serve mode (the entry rank of a replica), named for an autoscaler to read as they are.
SERVE_QUEUE_DEPTH = Gauge("conveyor_serve_queue_depth", "Requests waiting for a lane.", ["job"])
SERVE_RUNNING = Gauge("conveyor_serve_running_sequences", "Sequences in lanes (being generated).", ["job"])
SERVE_KV_CACHE_USAGE = Gauge(
    "conveyor_serve_kv_cache_usage_ratio",
    "KV cache positions held by running sequences / all positions.",
    ["job"],
)
SERVE_TOKENS_PER_SECOND = Gauge(
    "conveyor_serve_tokens_per_second", "Output tokens per second over the last second or more.", ["job"]
)
SERVE_TIME_TO_FIRST_TOKEN = Histogram(
    "conveyor_serve_time_to_first_token_seconds",
    "Time from a request's arrival to its first token (queueing included).",
    ["job"],
    buckets=_LATENCY_BUCKETS,
)
SERVE_INTER_TOKEN_LATENCY = Histogram(
    "conveyor_serve_inter_token_latency_seconds",
    "Time between consecutive tokens of one request.",
    ["job"],
    buckets=_LATENCY_BUCKETS,
)
SERVE_REQUESTS = Counter(
    "conveyor_serve_requests", "HTTP generation requests by status code (429: queue full).", ["job", "code"]
)


class Readiness:
    """Whether this rank can do its work: it joined its process group (``joined``, set by
    ``conveyor.distributed.init_distributed``) and, when the mode loads a model (``expect_model``), loaded
    its shard (``loaded``). Joining returns only once every rank of the world has connected."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._joined = self._needs_model = self._loaded = False

    def expect_model(self) -> None:
        with self._lock:
            self._needs_model = True

    def joined(self) -> None:
        with self._lock:
            self._joined = True

    def loaded(self) -> None:
        with self._lock:
            self._loaded = True

    def is_ready(self) -> bool:
        with self._lock:
            return self._joined and (self._loaded or not self._needs_model)


READINESS = Readiness()


CHILD_METRICS_FILE_ENV = "CONVEYOR_METRICS_FILE"
_EXPORT_SECONDS = 1.0


class _Exporter:
    """A train.command program's side: its ``conveyor_`` metrics, written atomically for its rank."""

    def __init__(self, path: str | None, registry: CollectorRegistry = REGISTRY):
        self.path = Path(path) if path else None
        self._ours = CollectorRegistry(auto_describe=False)
        self._ours.register(_Only(registry, "conveyor_"))  # process_* and python_* are the rank's own
        self._written = float("-inf")
        self._lock = threading.Lock()
        if self.path is not None:
            atexit.register(self.write)  # the last step's values, which the rate limit may have held back

    def maybe_write(self) -> None:
        now = time.monotonic()
        if self.path is not None and now - self._written >= _EXPORT_SECONDS:
            self._written = now
            self.write()

    def write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with self._lock:
            try:
                tmp.write_bytes(generate_latest(self._ours))
                os.replace(tmp, self.path)  # the rank never reads half a file
            except OSError:
                pass  # metrics must not stop training


class _Only:
    def __init__(self, registry: CollectorRegistry, prefix: str):
        self.registry, self.prefix = registry, prefix

    def collect(self) -> Iterator[Metric]:
        return (f for f in self.registry.collect() if f.name.startswith(self.prefix))


_EXPORTER = _Exporter(os.environ.get(CHILD_METRICS_FILE_ENV))


def export_to_rank() -> None:
    """In a train.command program, hand this process's metrics to its rank (no-op elsewhere)."""
    _EXPORTER.maybe_write()


class ChildMetrics:
    """The rank's side: the families a child program last wrote (``watch``), for ``_Merged``."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def watch(self, path: str | Path) -> None:
        self.path = Path(path)

    def families(self) -> dict[str, Metric]:
        if self.path is None:
            return {}
        try:
            return {f.name: f for f in text_string_to_metric_families(self.path.read_text())}
        except (OSError, ValueError):  # not written yet, or not by our exporter: the rank's own stand
            return {}


CHILD_METRICS = ChildMetrics()


class _Merged(CollectorRegistry):
    """``registry``'s families with a child program's merged in by name: one family per name, as the
    exposition format requires (the rank defines the same metrics, without values)."""

    def __init__(self, registry: CollectorRegistry, child: ChildMetrics):
        super().__init__(auto_describe=False)
        self.registry, self.child = registry, child

    def collect(self) -> Iterator[Metric]:
        theirs = self.child.families()
        for family in self.registry.collect():
            if (same := theirs.pop(family.name, None)) is not None:
                family.samples.extend(same.samples)
            yield family
        yield from theirs.values()

    def restricted_registry(self, names: Any) -> Any:  # a scrape's name[] parameters
        wanted = set(names)
        merged = self

        class Restricted:
            def collect(self) -> Iterator[Metric]:
                return (f for f in merged.collect() if any(s.name in wanted for s in f.samples))

        return Restricted()


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass  # probes every few seconds would flood the JSON log


def _app(
    registry: CollectorRegistry,
    readiness: Readiness,
    progress: Progress = PROGRESS,
    child: ChildMetrics = CHILD_METRICS,
) -> Any:
    metrics_app = make_wsgi_app(_Merged(registry, child))

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") == "/live":  # the liveness probe: has this rank made progress lately?
            live = progress.is_live()
            if not live:  # the kubelet is about to restart us: leave the cause for the operator's reason
                from conveyor.failure import write_cause

                write_cause(progress.hung_cause())
            start_response("200 OK" if live else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"live\n" if live else f"hung: no progress for {progress.silent_for():.0f}s\n".encode()]
        if environ.get("PATH_INFO") == "/ready":
            ok = readiness.is_ready()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ready\n" if ok else b"not ready\n"]
        return metrics_app(environ, start_response)

    return app


def serve(
    port: int,
    registry: CollectorRegistry = REGISTRY,
    readiness: Readiness = READINESS,
    progress: Progress = PROGRESS,
    child: ChildMetrics = CHILD_METRICS,
    host: str = "",
) -> bool:
    """Start the /metrics and /ready endpoints in a daemon thread; a taken port is logged, never fatal
    (metrics must not kill a job). ``host``: the address to listen on; "" is every interface."""
    if port <= 0:
        return False
    try:
        server = make_server(
            host,
            port,
            _app(registry, readiness, progress, child),
            _ThreadingServer,
            handler_class=_QuietHandler,
        )
    except OSError as err:
        from conveyor.log import get_logger

        get_logger(__name__).warning("metrics endpoint not started", extra={"port": port, "error": str(err)})
        return False
    threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True).start()
    return True
