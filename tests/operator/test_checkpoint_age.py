"""status.lastCheckpoint's age and interval, CheckpointStale for a running train job, the live reading of
rank 0's checkpoint metrics, and the operator's checkpoint-age gauge."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from conveyor import metrics as worker_metrics
from conveyor.job_status import CheckpointRef, GroupStatus, Phase
from conveyor.spec import parse_spec
from conveyor_operator import checkpoint_age, k8s, metrics, scrape
from conveyor_operator.observe import observe_pod
from conveyor_operator.plan import JobView, Plan
from conveyor_operator.reconcile import plan_reconcile
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from tests.operator.builders import T0, at, group_pods, inference_spec, job_body, stamp, train_spec


def ref(step: int, seconds: float | None) -> CheckpointRef:
    return CheckpointRef(step=step, time=stamp(seconds) if seconds is not None else None)


def test_refresh_learns_the_interval_per_every_steps_and_rounds_the_age_to_minutes() -> None:
    first = checkpoint_age.refresh(None, ref(10, 0), every=10, now=at(30))
    assert first is not None and first.interval_seconds is None and first.age_seconds == 0
    # 20 steps in 300 s: 150 s per checkpoint.every (10 steps)
    second = checkpoint_age.refresh(first, ref(30, 300), every=10, now=at(425))
    assert second is not None and second.interval_seconds == 150 and second.age_seconds == 120
    same = checkpoint_age.refresh(second, ref(30, 300), every=10, now=at(500))
    assert same is not None and same.interval_seconds == 150 and same.age_seconds == 180


def _running(since: float) -> list[GroupStatus]:
    return [GroupStatus(name="llm", phase=Phase.RUNNING, running_since=stamp(since))]


def test_stale_after_three_observed_intervals_by_default() -> None:
    spec = parse_spec(train_spec())
    last = ref(30, 300).model_copy(update={"interval_seconds": 100.0})
    assert checkpoint_age.stale(spec, Phase.RUNNING, last, _running(0), at(600)) is None
    found = checkpoint_age.stale(spec, Phase.RUNNING, last, _running(0), at(601))
    assert found is not None and found[0] == "CheckpointStale"
    assert "step 30" in found[1] and "301s old, over 300s" in found[1] and "3 x the observed 100s" in found[1]
    # only a running train job is judged
    assert checkpoint_age.stale(spec, Phase.RESTARTING, last, _running(0), at(9999)) is None
    inference = parse_spec(inference_spec())
    assert checkpoint_age.stale(inference, Phase.RUNNING, last, _running(0), at(9999)) is None


def test_stale_after_the_spec_field_and_from_running_start_without_a_checkpoint() -> None:
    spec = parse_spec(
        train_spec(checkpoint={"volume": "ckpt", "path": "/ckpt", "every": 10, "staleAfterSeconds": 120})
    )
    assert checkpoint_age.stale(spec, Phase.RUNNING, None, _running(100), at(220)) is None
    found = checkpoint_age.stale(spec, Phase.RUNNING, None, _running(100), at(221))
    assert found is not None and "no checkpoint committed in 121s of running" in found[1]
    assert "checkpoint.staleAfterSeconds" in found[1]
    # without the field and with no rate known yet, nothing is judged
    plain = parse_spec(train_spec())
    assert checkpoint_age.stale(plain, Phase.RUNNING, ref(10, 0), _running(0), at(99999)) is None


def test_stale_after_seconds_is_an_operator_field_not_the_workers() -> None:
    from conveyor_operator import render

    with_field = parse_spec(
        train_spec(checkpoint={"volume": "ckpt", "path": "/ckpt", "every": 10, "staleAfterSeconds": 600})
    )
    without = parse_spec(train_spec())
    assert render.worker_spec(with_field) == render.worker_spec(without)
    with pytest.raises(Exception, match="staleAfterSeconds"):
        parse_spec(train_spec(checkpoint={"volume": "ckpt", "path": "/ckpt", "staleAfterSeconds": 5}))


def _worker_metrics_text(job: str, step: int, when: float) -> str:
    """What a worker's /metrics shows after a commit (the worker's own gauges, not a copy of their names)."""
    worker_metrics.LAST_CHECKPOINT_STEP.labels(job).set(step)
    worker_metrics.LAST_CHECKPOINT_TIME.labels(job).set(when)

    class ThisJobsGauges:  # the process's registry holds what earlier tests left (other jobs, skips)
        def collect(self) -> Iterator[Metric]:
            for gauge in (worker_metrics.LAST_CHECKPOINT_STEP, worker_metrics.LAST_CHECKPOINT_TIME):
                for family in gauge.collect():
                    family.samples = [s for s in family.samples if s.labels.get("job") == job]
                    yield family

    registry = CollectorRegistry()
    registry.register(ThisJobsGauges())
    text = generate_latest(registry).decode()
    worker_metrics.LAST_CHECKPOINT_STEP.remove(job)
    worker_metrics.LAST_CHECKPOINT_TIME.remove(job)
    return text


def test_parse_reads_the_workers_checkpoint_gauges() -> None:
    text = _worker_metrics_text("llm", 40, T0.timestamp() + 90)
    assert scrape.parse_checkpoint(text) == ref(40, 90)
    assert scrape.parse_checkpoint("# nothing committed yet\n") is None


def test_parse_reads_the_skipped_checkpoints_too() -> None:
    text = _worker_metrics_text("llm", 40, T0.timestamp() + 90)
    text += (
        'conveyor_checkpoints_skipped{job="llm"} 2.0\n'
        'conveyor_checkpoint_last_skipped_step{job="llm",checkpoint="step-50",reason="missing"} 50.0\n'
    )
    seen = scrape.parse_checkpoint(text)
    assert seen is not None and seen.step == 40 and seen.skipped == 2
    assert seen.last_skipped is not None and seen.last_skipped.name == "step-50"
    assert seen.last_skipped.step == 50 and seen.last_skipped.reason == "missing"


@pytest.fixture
def metrics_server() -> Iterator[tuple[str, int, dict[str, str]]]:
    body = {"text": ""}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            data = body["text"].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "127.0.0.1", server.server_address[1], body
    server.shutdown()
    server.server_close()


def test_read_checkpoint_over_http_and_nothing_from_a_silent_pod(
    metrics_server: tuple[str, int, dict[str, str]],
) -> None:
    host, port, body = metrics_server
    body["text"] = _worker_metrics_text("llm", 7, T0.timestamp())
    assert scrape.read_checkpoint(host, port) == ref(7, 0)
    server = HTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    closed = server.server_address[1]
    server.server_close()
    assert scrape.read_checkpoint("127.0.0.1", closed) is None


def step(
    body: dict[str, Any], pods: list[dict[str, Any]], seconds: float, live: CheckpointRef | None
) -> Plan:
    plan = plan_reconcile(
        JobView.from_body(body), [observe_pod(p) for p in pods], at(seconds), live_checkpoint=live
    )
    body["status"] = k8s.status_patch(plan.status)
    return plan


def test_reconcile_reports_a_stale_checkpoint_of_a_running_train_job_and_its_recovery() -> None:
    body = job_body(train_spec())  # checkpoint.every 10
    step(body, [], 0, None)
    pods = group_pods(body)
    step(body, pods, 5, ref(10, 5))
    step(body, pods, 110, ref(20, 105))  # 100 s per 10 steps: stale beyond 300 s
    last = body["status"]["lastCheckpoint"]
    assert last == {"step": 20, "time": stamp(105), "ageSeconds": 0, "intervalSeconds": 100.0} | {
        "skipped": None,  # nothing skipped (the merge patch sends empty fields as null)
        "lastSkipped": None,
    }
    plan = step(body, pods, 400, ref(20, 105))
    assert not [c for c in body["status"]["conditions"] if c["type"] == "CheckpointStale"]
    plan = step(body, pods, 406, None)  # rank 0 did not answer: what was known stays
    stale = next(c for c in body["status"]["conditions"] if c["type"] == "CheckpointStale")
    assert stale["status"] == "True" and "step 20" in stale["message"]
    assert "CheckpointStale" in [e.reason for e in plan.events]
    assert body["status"]["lastCheckpoint"]["ageSeconds"] == 300 and body["status"]["phase"] == "Running"
    assert plan.delete_pods == []  # reported, not acted on
    step(body, pods, 410, ref(30, 408))
    stale = next(c for c in body["status"]["conditions"] if c["type"] == "CheckpointStale")
    assert stale["status"] == "False" and stale["reason"] == "CheckpointFresh"
    assert "ageSeconds" not in body["status"]["groups"][0]["lastCheckpoint"]


def test_checkpoint_age_gauge_is_set_and_dropped() -> None:
    metrics.record_checkpoint_age("ml", "llm", 42.0)
    assert (
        metrics.REGISTRY.get_sample_value(
            "conveyor_operator_checkpoint_age_seconds", {"namespace": "ml", "job": "llm"}
        )
        == 42.0
    )
    metrics.record_checkpoint_age("ml", "llm", None)
    metrics.record_checkpoint_age("ml", "llm", None)  # dropping twice is fine
    assert (
        metrics.REGISTRY.get_sample_value(
            "conveyor_operator_checkpoint_age_seconds", {"namespace": "ml", "job": "llm"}
        )
        is None
    )
    assert checkpoint_age.age_seconds(ref(1, 0), datetime(2026, 11, 23, 12, 1, 0, tzinfo=UTC)) == 60
