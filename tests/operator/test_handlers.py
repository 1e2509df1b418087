"""The handlers' reconcile loop against an in-memory API (k8s.Client faked; any raw HTTP fails loudly).
The same flows run against a real API server in tests/operator/test_cluster.py when it is available."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conveyor_operator import handlers, k8s, metrics

from tests.operator.builders import at, complete, fail, inference_spec, job_body, train_spec
from tests.operator.fake_cluster import FakeCluster

NS = "ml"


def sample(name: str, **labels: str) -> float:
    """A metric's value as the operator's /metrics endpoint reports it (0 before its first change)."""
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("Must not be called: a unit test reached for the network")

    import aiohttp
    import urllib3

    monkeypatch.setattr(urllib3.PoolManager, "urlopen", refuse)
    monkeypatch.setattr(urllib3.connectionpool.HTTPConnectionPool, "urlopen", refuse)
    monkeypatch.setattr(aiohttp.ClientSession, "_request", refuse)


class RecordedRequeues:
    """handlers.REQUEUES in these tests: records what a reconcile asked for instead of starting timers
    that would reconcile against the fake cluster at real times (requeue.py is tested below)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, float | None]] = []

    def request(self, namespace: str, name: str, delay: float | None) -> bool:
        self.requests.append((namespace, name, delay))
        return delay is not None


@pytest.fixture(autouse=True)
def requeues(monkeypatch: pytest.MonkeyPatch) -> RecordedRequeues:
    recorded = RecordedRequeues()
    monkeypatch.setattr(handlers, "REQUEUES", recorded)
    return recorded


@pytest.fixture
def cluster() -> Iterator[FakeCluster]:
    fake = FakeCluster()
    k8s.set_client(fake)
    yield fake
    k8s.set_client(None)


def run(cluster: FakeCluster, name: str, seconds: float) -> Any:
    cluster.clock = seconds
    return handlers.reconcile(NS, name, now=at(seconds))


def status(cluster: FakeCluster, name: str = "llm") -> dict[str, Any]:
    return cluster.jobs[(NS, name)]["status"]


def test_create_see_objects_fail_a_pod_and_see_the_group_restarted(cluster: FakeCluster) -> None:
    cluster.jobs[(NS, "llm")] = job_body(
        inference_spec(replicas=2, restartPolicy={"backoffSeconds": 0}), namespace=NS
    )
    run(cluster, "llm", 0)
    assert {k[0] + "/" + k[2] for k in cluster.objects} == {
        "Service/llm",
        "StatefulSet/llm-r0",
        "StatefulSet/llm-r1",
    }
    assert sorted(n for _, n in cluster.pods) == ["llm-r0-0", "llm-r0-1", "llm-r1-0", "llm-r1-1"]
    assert status(cluster)["phase"] == "Pending"

    cluster.set_ready(NS)
    run(cluster, "llm", 5)
    assert status(cluster)["phase"] == "Running" and status(cluster)["ready"] == "2/2"
    assert cluster.pod(NS, "llm-r1-1")["metadata"]["labels"]["conveyor.dev/stage"] == "1"

    writes = cluster.status_writes
    run(cluster, "llm", 6)
    assert cluster.status_writes == writes  # nothing changed: no write

    fail(cluster.pod(NS, "llm-r1-0"))
    restarts_before = sample("conveyor_operator_group_restarts_total", namespace=NS, job="llm")
    run(cluster, "llm", 10)
    assert sorted(cluster.deleted_pods) == ["llm-r1-0", "llm-r1-1"]
    job_status = status(cluster)
    assert job_status["phase"] == "Restarting" and job_status["restarts"] == 1
    assert [g["restarts"] for g in job_status["groups"]] == [0, 1]
    recreated = cluster.pod(NS, "llm-r1-0")["metadata"]["annotations"]["conveyor.dev/restart"]
    assert recreated == "1"
    sts_env = cluster.objects[("StatefulSet", NS, "llm-r1")]["spec"]["template"]["spec"]["containers"][0][
        "env"
    ]
    assert {"name": "CONVEYOR_RESTART", "value": "1"} in sts_env
    reasons = [e[1] for e in cluster.events]
    assert reasons[:4] == ["Pending", "Running", "ContainerRestarted", "GroupRestarted"]
    assert sample("conveyor_operator_group_restarts_total", namespace=NS, job="llm") == restarts_before + 1

    cluster.set_ready(NS, "llm-r1")
    run(cluster, "llm", 20)
    assert status(cluster)["phase"] == "Running"
    assert {c["type"]: c["status"] for c in status(cluster)["conditions"]} == {
        "Ready": "True",
        "Reconciling": "False",
        "Stalled": "False",
    }


def test_train_job_completes_and_its_pods_stop(cluster: FakeCluster) -> None:
    cluster.jobs[(NS, "t")] = job_body(train_spec(stages=2, replicas=1), name="t", namespace=NS)
    run(cluster, "t", 0)
    cluster.set_ready(NS)
    run(cluster, "t", 5)
    for name in ("t-0", "t-1"):
        complete(cluster.pod(NS, name), step=100)
    run(cluster, "t", 10)
    job_status = status(cluster, "t")
    assert job_status["phase"] == "Succeeded" and job_status["lastCheckpoint"]["step"] == 100
    assert cluster.objects[("StatefulSet", NS, "t")]["spec"]["replicas"] == 0
    assert cluster.pods == {}  # the fake controller scaled the StatefulSet down


def test_ttl_deletes_children_once(cluster: FakeCluster) -> None:
    cluster.jobs[(NS, "t")] = job_body(
        train_spec(stages=1, replicas=1, ttlSecondsAfterFinished=30), name="t", namespace=NS
    )
    run(cluster, "t", 0)
    cluster.set_ready(NS)
    run(cluster, "t", 1)
    complete(cluster.pod(NS, "t-0"))
    run(cluster, "t", 2)
    run(cluster, "t", 40)
    assert cluster.objects == {} and ("Normal", "Cleaned") in [(e[0], e[1]) for e in cluster.events]
    events = len(cluster.events)
    run(cluster, "t", 50)
    assert len(cluster.events) == events and status(cluster, "t")["phase"] == "Succeeded"


def test_a_deleted_job_is_forgotten(cluster: FakeCluster) -> None:
    assert handlers.reconcile(NS, "gone", now=at(0)) is None


def test_errors_are_counted_and_raised(cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster.jobs[(NS, "llm")] = job_body(inference_spec(), namespace=NS)

    def broken(obj: dict[str, Any]) -> None:
        raise RuntimeError("apply refused")

    monkeypatch.setattr(cluster, "apply", broken)
    before = sample("conveyor_operator_reconciles_total", result="error")
    with pytest.raises(RuntimeError, match="apply refused"):
        run(cluster, "llm", 0)
    assert sample("conveyor_operator_reconciles_total", result="error") == before + 1


def test_status_patch_clears_fields_that_became_empty(cluster: FakeCluster) -> None:
    from conveyor.job_status import PipelineJobStatus

    patch = k8s.status_patch(PipelineJobStatus())
    assert patch["lastCheckpoint"] is None and patch["completionTime"] is None and patch["phase"] == "Pending"


def test_metrics_endpoint_text() -> None:
    from prometheus_client import generate_latest

    before = sample("conveyor_operator_jobs", phase="Suspended")
    metrics.record_phase("m", "a", "Suspended")
    metrics.record_phase("m", "b", "Suspended")
    metrics.record_phase("m", "b", None)
    assert sample("conveyor_operator_jobs", phase="Suspended") == before + 1
    text = generate_latest(metrics.REGISTRY).decode()
    assert 'conveyor_operator_jobs{phase="Suspended"}' in text
    assert "conveyor_operator_reconcile_duration_seconds_bucket" in text


def test_kopf_entry_points_route_to_the_jobs_reconcile(cluster: FakeCluster) -> None:
    cluster.jobs[(NS, "llm")] = job_body(inference_spec(replicas=1), namespace=NS)
    handlers.on_job_event(type="ADDED", name="llm", namespace=NS)
    assert ("StatefulSet", NS, "llm-r0") in cluster.objects
    cluster.set_ready(NS)
    handlers.on_pod_event(body=cluster.pod(NS, "llm-r0-0"), labels={"conveyor.dev/job": "llm"}, namespace=NS)
    assert status(cluster)["phase"] == "Running"
    handlers.on_job_event(type="DELETED", name="llm", namespace=NS)  # forgotten, no API call needed
    handlers.resync(name="llm", namespace=NS)
    assert status(cluster)["phase"] == "Running"


def test_kopf_settings_keep_objects_small() -> None:
    import kopf

    settings = kopf.OperatorSettings()
    handlers.configure(settings=settings)
    assert settings.persistence.finalizer == "conveyor.dev/operator"
    assert isinstance(settings.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)
    # a deletion that meets a running resync timer waits for it about a second, not kopf's default minute
    assert settings.background.cancellation_polling <= 2


def test_a_failed_pod_already_replaced_by_the_statefulset_still_restarts_its_group(
    cluster: FakeCluster,
) -> None:
    from tests.operator.builders import evict

    cluster.jobs[(NS, "llm")] = job_body(
        inference_spec(replicas=1, restartPolicy={"backoffSeconds": 0}), namespace=NS
    )
    run(cluster, "llm", 0)
    for i, pod in enumerate(cluster.pods.values()):
        pod["metadata"]["uid"] = f"uid-{i}"
    # The watch event shows llm-r0-1 Failed; the StatefulSet controller has already replaced it.
    failed = evict(cluster.pod(NS, "llm-r0-1"))
    failed["metadata"]["deletionTimestamp"] = "2026-11-23T12:00:01Z"  # the DELETED event's last state
    cluster.pods.pop((NS, "llm-r0-1"))
    cluster.clock = 1
    cluster._sync_statefulset(cluster.objects[("StatefulSet", NS, "llm-r0")])
    handlers.on_pod_event(body=failed, labels={"conveyor.dev/job": "llm"}, namespace=NS)
    job_status = status(cluster)
    assert job_status["restarts"] == 1 and "PodEvicted" in [e[1] for e in cluster.events]
    assert cluster.pod(NS, "llm-r0-0")["metadata"]["annotations"]["conveyor.dev/restart"] == "1"


def test_a_backoff_asks_for_a_reconcile_when_it_ends(
    cluster: FakeCluster, requeues: RecordedRequeues
) -> None:
    cluster.jobs[(NS, "llm")] = job_body(
        inference_spec(replicas=1, restartPolicy={"backoffSeconds": 3, "maxBackoffSeconds": 3}), namespace=NS
    )
    run(cluster, "llm", 0)
    cluster.set_ready(NS)
    run(cluster, "llm", 5)
    fail(cluster.pod(NS, "llm-r0-0"))
    run(cluster, "llm", 10)
    assert status(cluster)["phase"] == "Restarting" and status(cluster).get("restarts", 0) == 0  # waiting
    assert requeues.requests[-1] == (NS, "llm", 3.0)  # the backoff's end, not the next resync
    run(cluster, "llm", 13)
    assert status(cluster)["restarts"] == 1


def test_requeues_fire_once_at_the_earliest_time_asked() -> None:
    import threading
    import time

    from conveyor_operator.requeue import Requeues

    fired: list[tuple[str, str, float]] = []
    done = threading.Event()

    def reconcile(namespace: str, name: str) -> None:
        fired.append((namespace, name, time.monotonic()))
        done.set()

    requeues = Requeues(reconcile, horizon=10.0)
    assert not requeues.request(NS, "llm", None)  # nothing to wait for
    assert not requeues.request(NS, "llm", 10.0)  # the resync timer comes by then anyway
    start = time.monotonic()
    assert requeues.request(NS, "llm", 1.0)
    assert requeues.request(NS, "llm", 0.3)  # sooner: replaces the later one
    assert not requeues.request(NS, "llm", 2.0)  # later than the one pending: nothing new
    assert 0.0 < (requeues.pending(NS, "llm") or 0.0) <= 0.4
    assert done.wait(5.0)
    time.sleep(0.3)
    assert len(fired) == 1 and fired[0][:2] == (NS, "llm")
    assert fired[0][2] - start >= 0.3
    assert requeues.pending(NS, "llm") is None
    time.sleep(max(0.0, 1.0 - (time.monotonic() - start)) + 0.3)  # the replaced 1 s request never fires
    assert len(fired) == 1


def test_a_failing_requeued_reconcile_is_swallowed() -> None:
    import threading

    from conveyor_operator.requeue import Requeues

    done = threading.Event()

    def reconcile(namespace: str, name: str) -> None:
        done.set()
        raise RuntimeError("the API server is away")

    requeues = Requeues(reconcile, horizon=10.0)
    requeues.request(NS, "llm", 0.0)
    assert done.wait(5.0)
    requeues.request(NS, "llm", 0.0)  # and it can be asked for again


class Refused(Exception):
    """What the kubernetes client raises when the API server refuses an object as invalid."""

    status = 422
    body = '{"kind": "Status", "message": "StatefulSet.apps \\"llm-r0\\" is invalid: spec.template.spec.tolerations[0].effect: Unsupported value: \\"Sometimes\\""}'


def test_an_object_the_api_server_refuses_fails_the_job_with_its_words_until_the_spec_changes(
    cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A valid spec whose pass-through parts (a toleration, an affinity, a volume source) make the API
    server refuse the StatefulSet: the job said Pending and only the operator's log said why. It is
    Failed/ApplyRefused with the server's words, and stays so (nothing applied, no status written again)
    until the spec changes."""
    spec = inference_spec(template={"tolerations": [{"key": "gpu", "effect": "Sometimes"}]})
    cluster.jobs[(NS, "llm")] = job_body(spec, namespace=NS)
    applies: list[str] = []
    real_apply = cluster.apply

    def apply(obj: dict[str, Any]) -> None:
        applies.append(obj["metadata"]["name"])
        if obj["kind"] == "StatefulSet" and any(
            t.get("effect") == "Sometimes" for t in obj["spec"]["template"]["spec"].get("tolerations", [])
        ):
            raise Refused()
        real_apply(obj)

    monkeypatch.setattr(cluster, "apply", apply)
    run(cluster, "llm", 0)
    got = status(cluster)
    assert (got["phase"], got["reason"]) == ("Failed", "ApplyRefused"), got
    assert got["message"].startswith('the API server refused StatefulSet llm-r0: StatefulSet.apps "llm-r0"')
    assert "tolerations[0].effect" in got["message"] and "fix the spec" in got["message"]
    assert ("Warning", "Failed", got["message"]) in cluster.events

    tried, writes = len(applies), cluster.status_writes
    for t in (10, 20):
        run(cluster, "llm", t)  # the resync: the same spec would be refused again
    assert len(applies) == tried and cluster.status_writes == writes
    assert status(cluster)["reason"] == "ApplyRefused"

    fixed = job_body(inference_spec(), namespace=NS, status=status(cluster), generation=2)
    cluster.jobs[(NS, "llm")] = fixed
    run(cluster, "llm", 30)
    assert status(cluster)["phase"] != "Failed" and ("StatefulSet", NS, "llm-r0") in cluster.objects


def test_other_api_errors_are_raised_for_kopf_to_retry(
    cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Unavailable(Exception):
        status = 503

    def apply(obj: dict[str, Any]) -> None:
        raise Unavailable()

    cluster.jobs[(NS, "llm")] = job_body(inference_spec(), namespace=NS)
    monkeypatch.setattr(cluster, "apply", apply)
    with pytest.raises(Unavailable):
        run(cluster, "llm", 0)
    assert status(cluster).get("reason") != "ApplyRefused"
