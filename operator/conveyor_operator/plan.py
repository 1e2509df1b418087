"""What one reconcile decides (``reconcile.plan_reconcile``): the Plan that ``handlers.execute`` carries
out, the Events it records, the parts of the PipelineJob it reads (JobView), and the shared tail of every
plan (``finish``: conditions, a transition Event, observedGeneration)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from conveyor.job_status import Phase, PipelineJobStatus

from conveyor_operator.conditions import fleet_reconciling, mark_reconciling, problem_conditions
from conveyor_operator.observe import PodObservation
from conveyor_operator.phase import conditions

# Reasons that need a person to act, whatever the phase: Stalled=True.
STALLED_REASONS = {"BackoffLimitExceeded", "InvalidSpec", "LayoutChangeRefused"}


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass
class Plan:
    apply: list[dict[str, Any]] = field(default_factory=list)
    # Pod deletions: graceful (the kubelet stops the containers within the pod's grace period, and only
    # then does the StatefulSet create the pod's successor, so two generations of a rank never run at
    # once), and forced for pods stuck terminating (a lost node never confirms; see STUCK_TERMINATING).
    delete_pods: list[str] = field(default_factory=list)
    force_delete_pods: list[str] = field(default_factory=list)
    # Preconditions for delete_pods: a pod is deleted only if it still has the uid that was observed, so a
    # stale observation never deletes the pod the StatefulSet has since recreated under the same name.
    pod_uids: dict[str, str] = field(default_factory=dict)
    delete_children: bool = False  # TTL after finishing: StatefulSets, Services, PDB
    delete_statefulsets: list[str] = field(default_factory=list)  # groups scaled away
    label_pods: dict[str, dict[str, str]] = field(default_factory=dict)
    status: PipelineJobStatus = field(default_factory=PipelineJobStatus)
    events: list[Event] = field(default_factory=list)
    restarts: list[str] = field(default_factory=list)  # groups restarted by this plan (metrics)
    fatal: str | None = None  # a failure a failurePolicy rule fails the job for (FailJob)
    problems: dict[str, tuple[str, str] | None] = field(default_factory=dict)  # conditions.PROBLEMS found
    requeue_after: float | None = None

    def delete(self, pods: list[PodObservation]) -> None:
        """Delete ``pods`` gracefully, each only while it keeps the uid observed."""
        for pod in pods:
            self.delete_pods.append(pod.name)
            if pod.uid:
                self.pod_uids[pod.name] = pod.uid


@dataclass(frozen=True)
class JobView:
    """The parts of the PipelineJob object a reconcile reads."""

    name: str
    namespace: str
    uid: str
    generation: int | None
    spec: dict[str, Any]
    status: dict[str, Any]

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> JobView:
        meta = body.get("metadata", {})
        return cls(
            name=meta["name"],
            namespace=meta.get("namespace", "default"),
            uid=meta.get("uid", ""),
            generation=meta.get("generation"),
            spec=dict(body.get("spec") or {}),
            status=dict(body.get("status") or {}),
        )


def old_status(raw: dict[str, Any]) -> PipelineJobStatus:
    try:
        return PipelineJobStatus.model_validate(raw)
    except ValueError:
        return PipelineJobStatus()  # an unreadable status is rebuilt, not fatal


def finish(plan: Plan, job: JobView, now: datetime) -> Plan:
    """Shared tail: conditions, a transition Event, observedGeneration."""
    status = plan.status
    status.observed_generation = job.generation
    old = old_status(job.status)
    reason = status.reason or status.phase
    status.conditions = conditions(
        Phase(status.phase),
        reason=reason,
        message=status.message or "",
        generation=job.generation,
        previous=old.conditions,
        now=now,
        stalled=status.reason in STALLED_REASONS,
    )
    moving = fleet_reconciling(status.fleet) if status.phase == Phase.RUNNING else None
    if moving is not None:
        status.conditions = mark_reconciling(status.conditions, *moving, previous=old.conditions, now=now)
    found, started = problem_conditions(
        plan.problems, previous=old.conditions, generation=job.generation, now=now
    )
    status.conditions += found
    plan.events += [Event("Warning", c.reason, c.message) for c in started]
    if old.phase != status.phase or not job.status:
        kind = "Warning" if status.phase == Phase.FAILED else "Normal"
        plan.events.append(Event(kind, str(status.phase), status.message or f"phase {status.phase}"))
    return plan
