"""kopf handlers: a few lines each. Every trigger (the job changed, one of its pods changed, the resync
timer) runs the same level-based ``reconcile``: read the job and its pods, plan (pure), carry the plan
out. Status is written once per reconcile, and only when it changed. A plan that needs a reconcile at a time
(a backoff ending) gets one (requeue.py).

No create/update handlers are registered, so kopf keeps no last-handled-configuration annotation on
the objects (their size stays the user's), and the user's spec is never patched (GitOps).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import kopf
from conveyor.job_status import CheckpointRef, Phase, PipelineJobStatus
from conveyor.spec import GROUP, PLURAL, VERSION, Mode, PipelineJobSpec

from conveyor_operator import checkpoint_age, k8s, metrics, scrape
from conveyor_operator.observe import PodObservation, merge_witness, observe_pod
from conveyor_operator.plan import JobView, Plan
from conveyor_operator.reconcile import plan_reconcile, refused_by_the_api_server
from conveyor_operator.render import JOB_LABEL
from conveyor_operator.requeue import Requeues

RESYNC_SECONDS = 10.0
FINALIZER = "conveyor.dev/operator"
log = logging.getLogger(__name__)

_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(namespace: str, name: str) -> threading.Lock:
    # Triggers for one job arrive from several kopf workers; one reconcile at a time per job.
    with _locks_guard:
        return _locks.setdefault((namespace, name), threading.Lock())


def execute(client: k8s.Client, body: dict[str, Any], plan: Plan, now: datetime | None = None) -> None:
    """Carry a plan out. Status first: a restart's new count is recorded before any pod goes, so a crash
    half way leaves pods of an 'earlier restart' that the next reconcile replaces."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    new_status = k8s.status_patch(plan.status)
    old_status = k8s.status_patch(PipelineJobStatus.model_validate(body.get("status") or {}))
    if new_status != old_status or not body.get("status"):
        client.patch_status(ns, name, new_status)
    for obj in plan.apply:
        try:
            client.apply(obj)
        except Exception as err:
            message = k8s.refusal(err)
            if message is None:
                raise
            job, when = JobView.from_body(body), now or datetime.now(UTC)
            refused = refused_by_the_api_server(job, plan.status, obj, message, when)
            client.patch_status(ns, name, k8s.status_patch(refused.status))
            for ev in refused.events:
                client.event(body, ev.type, ev.reason, ev.message)
            plan.status, plan.events = refused.status, plan.events + refused.events
            return
    for pod, labels in sorted(plan.label_pods.items()):
        client.label_pod(ns, pod, labels)
    for pod in sorted(set(plan.delete_pods)):
        client.delete_pod(ns, pod, plan.pod_uids.get(pod))
    for pod in sorted(set(plan.force_delete_pods)):
        client.delete_pod(ns, pod, plan.pod_uids.get(pod), force=True)
    for sts in plan.delete_statefulsets:
        client.delete_statefulset(ns, sts)
    if plan.delete_children:
        client.delete_children(ns, name)
    for ev in plan.events:
        client.event(body, ev.type, ev.reason, ev.message)


def with_witnesses(pods: list[PodObservation], witnesses: Sequence[PodObservation]) -> list[PodObservation]:
    """The listing plus what watch events showed: a Failed pod may already be gone from the listing (the
    StatefulSet controller replaces Failed pods at once) and its failure must still restart the group; a
    listed pod may have exited again since the event, overwriting the exit the event showed."""
    seen = {w.uid: w for w in witnesses}
    merged = [merge_witness(p, seen[p.uid]) if p.uid in seen else p for p in pods]
    listed = {p.uid for p in pods}
    gone = [
        dataclasses.replace(w, deletion_deadline=None, listed=False)
        for w in witnesses
        if w.uid not in listed and w.failure is not None
    ]
    return merged + gone


def _live_checkpoint(body: dict[str, Any], pods: Sequence[PodObservation]) -> CheckpointRef | None:
    """A running train job's rank 0 (pod 0) reports its last commit in its metrics: read it there."""
    spec = body.get("spec") or {}
    if spec.get("mode") != Mode.TRAIN:
        return None
    port = int(spec.get("metricsPort") or PipelineJobSpec.model_fields["metrics_port"].default)
    rank0 = [p for p in pods if p.index == 0 and p.ready and p.listed and not p.deleting and p.ip]
    return scrape.read_checkpoint(str(rank0[0].ip), port) if rank0 else None


def reconcile(
    namespace: str, name: str, now: datetime | None = None, witnesses: Sequence[PodObservation] = ()
) -> Plan | None:
    """Reconcile one PipelineJob; returns the plan carried out (None: the job is gone or going).

    ``witnesses`` are pods seen in watch events (see ``with_witnesses``)."""
    started = time.monotonic()
    try:
        with _lock(namespace, name):
            client = k8s.get_client()
            body = client.get_job(namespace, name)
            if body is None or body.get("metadata", {}).get("deletionTimestamp"):
                metrics.record_phase(namespace, name, None)
                metrics.record_checkpoint_age(namespace, name, None)
                return None
            pods = [observe_pod(p) for p in client.list_pods(namespace, name)]
            pods = with_witnesses(pods, witnesses)
            now = now or datetime.now(UTC)
            live = _live_checkpoint(body, pods)
            plan = plan_reconcile(JobView.from_body(body), pods, now, live_checkpoint=live)
            if plan.delete_children and not client.children_exist(namespace, name):
                plan.delete_children, plan.events = False, [e for e in plan.events if e.reason != "Cleaned"]
            execute(client, body, plan, now)
    except Exception:
        metrics.RECONCILES.labels(result="error").inc()
        log.exception("reconcile failed", extra={"namespace": namespace, "job": name})
        raise
    finally:
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
    metrics.RECONCILES.labels(result="ok").inc()
    REQUEUES.request(namespace, name, plan.requeue_after)  # a backoff ends, a deadline passes: come back
    metrics.record_phase(namespace, name, str(plan.status.phase))
    running = plan.status.phase == Phase.RUNNING
    age = checkpoint_age.age_seconds(plan.status.last_checkpoint, now) if running else None
    metrics.record_checkpoint_age(namespace, name, age)
    for _ in plan.restarts:
        metrics.GROUP_RESTARTS.labels(namespace=namespace, job=name).inc()
    for ev in plan.events:
        log.info(
            ev.message,
            extra={"namespace": namespace, "job": name, "reason": ev.reason, "phase": plan.status.phase},
        )
    return plan


def _requeued(namespace: str, name: str) -> None:
    reconcile(namespace, name)


REQUEUES = Requeues(_requeued, horizon=RESYNC_SECONDS)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="conveyor.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="conveyor.dev")
    settings.posting.level = logging.WARNING  # our own Events cover transitions; kopf's only its errors
    # A job deleted while its resync timer runs keeps kopf's finalizer until kopf sees the timer gone, and
    # kopf looks again only after this long (default 60 s: a `kubectl delete` hung that long in e2e).
    settings.background.cancellation_polling = 1.0


@kopf.on.event(GROUP, VERSION, PLURAL)
def on_job_event(type: str, name: str, namespace: str | None, **_: Any) -> None:
    assert namespace is not None  # PipelineJobs are namespaced
    if type == "DELETED":
        metrics.record_phase(namespace, name, None)
        return
    reconcile(namespace, name)


@kopf.on.event("", "v1", "pods", labels={JOB_LABEL: kopf.PRESENT})
def on_pod_event(body: Mapping[str, Any], labels: Mapping[str, str], namespace: str | None, **_: Any) -> None:
    assert namespace is not None
    # The StatefulSet controller deletes a Failed pod at once, and kopf may hand us only the last event
    # (DELETED, carrying the Failed state): the failure still counts, deletion or not.
    reconcile(namespace, labels[JOB_LABEL], witnesses=[observe_pod(body)])  # type: ignore[arg-type]


@kopf.timer(GROUP, VERSION, PLURAL, interval=RESYNC_SECONDS)
def resync(name: str, namespace: str | None, **_: Any) -> None:
    assert namespace is not None
    # Time-driven decisions (backoff ends, startup timeouts, TTL) need a clock as well as events.
    reconcile(namespace, name)
