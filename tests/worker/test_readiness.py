"""The worker's /ready endpoint on the metrics port: 503 until the rank joined its process group and, when
its mode loads a model, loaded its shard; /metrics keeps working on the same port."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
import torch.distributed as dist
from conveyor import metrics
from conveyor.distributed import init_distributed
from conveyor.utils import free_port
from prometheus_client import CollectorRegistry, Counter


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_ready_turns_200_only_after_join_and_load() -> None:
    registry, readiness = CollectorRegistry(), metrics.Readiness()
    Counter("conveyor_test_things", "Things.", registry=registry).inc(3)
    port = free_port()
    assert metrics.serve(port, registry=registry, readiness=readiness)
    readiness.expect_model()
    assert get(port, "/ready") == (503, "not ready\n")
    readiness.joined()
    assert get(port, "/ready")[0] == 503  # joined, shard not loaded yet
    readiness.loaded()
    assert get(port, "/ready") == (200, "ready\n")
    status, body = get(port, "/metrics")
    assert status == 200 and "conveyor_test_things_total 3.0" in body


def test_a_mode_without_a_model_is_ready_once_joined() -> None:
    readiness = metrics.Readiness()
    assert not readiness.is_ready()
    readiness.joined()
    assert readiness.is_ready()


def test_a_taken_port_is_not_fatal() -> None:
    port = free_port()
    assert metrics.serve(port, registry=CollectorRegistry(), readiness=metrics.Readiness())
    assert not metrics.serve(port, registry=CollectorRegistry(), readiness=metrics.Readiness())


def test_joining_the_process_group_marks_the_rank_joined(monkeypatch: pytest.MonkeyPatch) -> None:
    readiness = metrics.Readiness()
    monkeypatch.setattr(metrics, "READINESS", readiness)
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # restored after the test
    assert not readiness.is_ready()
    init_distributed(device="cpu", timeout_seconds=30)
    try:
        assert readiness.is_ready()
    finally:
        dist.destroy_process_group()
