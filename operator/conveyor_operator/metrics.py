"""Operator metrics (Prometheus, prefix ``conveyor_operator_``), in a registry of their own so the
operator's endpoint shows only these."""

from __future__ import annotations

import contextlib

from conveyor.job_status import Phase
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

RECONCILES = Counter(
    "conveyor_operator_reconciles",
    "Reconciles of PipelineJobs by result (ok, error).",
    ["result"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "conveyor_operator_reconcile_duration_seconds",
    "Time of one reconcile, API calls included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
JOBS = Gauge("conveyor_operator_jobs", "PipelineJobs by phase.", ["phase"], registry=REGISTRY)
GROUP_RESTARTS = Counter(
    "conveyor_operator_group_restarts",
    "Group restarts started by the operator.",
    ["namespace", "job"],
    registry=REGISTRY,
)

CHECKPOINT_AGE = Gauge(
    "conveyor_operator_checkpoint_age_seconds",
    "Age of each running job's last committed checkpoint, at its last reconcile (absent: none known).",
    ["namespace", "job"],
    registry=REGISTRY,
)

_phases: dict[tuple[str, str], str] = {}


def record_checkpoint_age(namespace: str, name: str, age: float | None) -> None:
    """Publish a job's checkpoint age; None (no checkpoint known, the job finished or is gone) drops it."""
    if age is None:
        with contextlib.suppress(KeyError):  # never published
            CHECKPOINT_AGE.remove(namespace, name)
    else:
        CHECKPOINT_AGE.labels(namespace=namespace, job=name).set(age)


def record_phase(namespace: str, name: str, phase: str | None) -> None:
    """Track each job's phase (None: the job is gone) and publish the count per phase."""
    if phase is None:
        _phases.pop((namespace, name), None)
    else:
        _phases[(namespace, name)] = phase
    for p in Phase:
        JOBS.labels(phase=p.value).set(sum(1 for v in _phases.values() if v == p.value))


def serve(port: int) -> None:
    if port > 0:
        start_http_server(port, registry=REGISTRY)
