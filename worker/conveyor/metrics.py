"""Worker metrics (Prometheus, prefix ``conveyor_``), names as in docs/design.md.

Every worker process serves them on ``metrics_port + local_rank`` (one port per process, so T ranks in a
pod never collide); ``conveyor run`` offsets ports per pod the same way.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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


def serve(port: int, registry: CollectorRegistry = REGISTRY) -> bool:
    """Start the /metrics endpoint; a taken port is logged, never fatal (metrics must not kill a job)."""
    if port <= 0:
        return False
    try:
        start_http_server(port, registry=registry)
    except OSError as err:
        from conveyor.log import get_logger

        get_logger(__name__).warning("metrics endpoint not started", extra={"port": port, "error": str(err)})
        return False
    return True
