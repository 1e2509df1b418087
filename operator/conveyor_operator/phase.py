"""The phase machine (pure): observed pods -> group state -> job phase -> conditions.

A group is the restart unit: one replica's StatefulSet (inference, serve) or the whole job (train). Its
pods of the *current generation* carry the group's restart count and the spec's template hash; pods of
an earlier restart are being replaced, pods with another hash are waiting for a rolling update.

Failures of a group, in the order they are checked:
- PodFailed / PodEvicted: a current pod's phase is Failed (eviction included), not by its deletion;
- Disrupted: a current pod is being deleted with the DisruptionTarget condition (the Eviction API, a
  preemption, a node drain): its peers are about to fail on the lost rank, and the failure rules must
  see the disruption while the pod is still there, not only the peers' exits that follow;
- ContainerRestarted: the worker container exited non-zero and the kubelet restarted it in place, or it
  restarted and the exit is no longer visible (accounted once per exit by ``restarts.py``);
- PodDeleted: a group that was running lost a pod, or has a pod created after it started running (the
  StatefulSet replaced a deleted pod, alone, so the other ranks wait on a peer that lost its state);
- StartupTimeout: every pod scheduled, but not every pod ready within ``startupTimeoutSeconds`` of the
  group's (re)start.
Any of them restarts the whole group after the backoff, until the job's ``backoffLimit`` is spent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from conveyor.job_status import Condition, GroupFailure, Phase
from conveyor.spec import RestartPolicySpec

from conveyor_operator.failure_rules import DISRUPTION_CONDITION
from conveyor_operator.observe import PodFailure, PodObservation, parse_time


def format_time(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class GroupPods:
    """A group's pods, sorted by generation."""

    current: list[PodObservation]  # this restart, this template: the group's ranks now
    previous: list[PodObservation]  # an earlier restart: replace at once
    outdated: list[PodObservation]  # this restart, older template: replace in a rolling update
    group: str = ""  # the StatefulSet: pod `{group}-{index}`
    leaving: list[PodObservation] = field(default_factory=list)  # this restart's, being deleted

    @property
    def live(self) -> list[PodObservation]:
        """The group's ranks now: outdated pods still run the job until their group's turn to roll."""
        return self.current + self.outdated


def split_pods(
    pods: Sequence[PodObservation],
    group: str,
    size: int,
    restart: int,
    template_hash: str,
) -> GroupPods:
    current, previous, outdated, leaving = [], [], [], []
    for pod in pods:
        if pod.group != group or pod.index >= size:
            continue  # another group's, or beyond a scale-down
        if pod.deleting:
            if pod.restart == restart:
                leaving.append(pod)  # already going: not a rank, but its conditions say why
            continue
        if not pod.listed and (pod.restart != restart or pod.failure is None):
            continue  # seen only in a watch event and gone: only a failure of this generation matters
        if pod.restart != restart:
            previous.append(pod)
        elif pod.template_hash != template_hash:
            outdated.append(pod)
        else:
            current.append(pod)
    return GroupPods(current, previous, outdated, group, leaving)


def detect_failure(
    pods: GroupPods,
    size: int,
    *,
    start_time: datetime | None,
    running_since: datetime | None,
    members_since: datetime | None = None,
    policy: RestartPolicySpec,
    now: datetime,
    container_failure: PodFailure | None = None,
) -> GroupFailure | None:
    """The first failure of the group's current generation, or None (see the module doc for the order).
    ``container_failure`` is the first exit past the group's watermarks (``restarts.account_group``)."""
    stamp = format_time(now)
    live = pods.live
    for pod in sorted(live, key=lambda p: p.index):
        if pod.phase_failure is not None:
            return GroupFailure(
                reason=pod.phase_failure.reason, message=pod.phase_failure.message, time=stamp
            )
    for pod in sorted(pods.leaving, key=lambda p: p.index):
        if DISRUPTION_CONDITION in pod.conditions:
            return GroupFailure(
                reason="Disrupted",
                message=f"pod {pod.name} is being evicted or preempted ({DISRUPTION_CONDITION})",
                time=stamp,
            )
    if container_failure is not None:
        return GroupFailure(reason=container_failure.reason, message=container_failure.message, time=stamp)
    if running_since is not None and not pods.previous:
        missing = sorted(set(range(size)) - {p.index for p in live})
        if missing:
            names = ", ".join(f"{pods.group}-{i}" for i in missing)
            return GroupFailure(
                reason="PodDeleted",
                message=f"pod {names} gone while the group was running ({len(missing)} of {size})",
                time=stamp,
            )
        # Compared with the newest pod's creationTimestamp when the group became ready: both come from
        # the API server's clock, so an operator's clock skew cannot fake a replacement.
        newest = members_since or running_since
        replaced = [p.name for p in live if p.created is not None and p.created > newest]
        if replaced:
            return GroupFailure(
                reason="PodDeleted",
                message=f"pod {replaced[0]} was replaced while the group was running",
                time=stamp,
            )
    # A group waiting for capacity (a pod not scheduled) is Pending, not failing: restarting it frees
    # nothing. The startup budget covers model loading.
    scheduled = len(live) == size and all(p.scheduled for p in live)
    if start_time is not None and running_since is None and scheduled:
        done = all(p.ready or p.completed for p in live)
        deadline = start_time + timedelta(seconds=policy.startup_timeout_seconds)
        if not done and now >= deadline:
            ready = sum(p.ready for p in live)
            return GroupFailure(
                reason="StartupTimeout",
                message=f"{ready} of {size} pods ready {policy.startup_timeout_seconds}s after the group started "
                "(raise spec.restartPolicy.startupTimeoutSeconds if loading the model takes longer)",
                time=stamp,
            )
    return None


def group_phase(pods: GroupPods, size: int, *, failing: bool) -> Phase:
    if failing or pods.previous:
        return Phase.RESTARTING
    current = pods.live
    if len(current) == size and size > 0 and all(p.completed for p in current):
        return Phase.SUCCEEDED
    if len(current) == size and all(p.ready or p.completed for p in current):
        return Phase.RUNNING
    if any(p.scheduled for p in current):
        return Phase.STARTING
    return Phase.PENDING


def job_phase(group_phases: Sequence[Phase], *, completes: bool) -> Phase:
    """Aggregate of the groups. Batch jobs (``completes``) succeed when every group has; serve never does."""
    phases = list(group_phases)
    if any(p == Phase.RESTARTING for p in phases):
        return Phase.RESTARTING
    if completes and phases and all(p == Phase.SUCCEEDED for p in phases):
        return Phase.SUCCEEDED
    if all(p in (Phase.RUNNING, Phase.SUCCEEDED) for p in phases):
        return Phase.RUNNING
    if all(p == Phase.PENDING for p in phases):
        return Phase.PENDING
    return Phase.STARTING


def _condition(type_: str, ok: bool, reason: str, message: str, generation: int | None) -> Condition:
    return Condition(
        type=type_,
        status="True" if ok else "False",
        reason=reason,
        message=message,
        observed_generation=generation,
    )


def conditions(
    phase: Phase,
    *,
    reason: str,
    message: str,
    generation: int | None,
    previous: Sequence[Condition],
    now: datetime,
    stalled: bool = False,
) -> list[Condition]:
    """``Ready`` (positive polarity) plus ``Reconciling`` and ``Stalled``, as Argo CD and Flux read them;
    ``lastTransitionTime`` moves only when a condition's status does. ``stalled`` marks a job that needs
    a person (a refused change) even though its phase is not Failed."""
    healthy = phase in (Phase.RUNNING, Phase.SUCCEEDED) and not stalled
    progressing = phase in (Phase.PENDING, Phase.STARTING, Phase.RESTARTING)
    stalled = stalled or phase == Phase.FAILED
    fresh = [
        _condition("Ready", healthy, reason, message, generation),
        _condition(
            "Reconciling",
            progressing,
            reason if progressing else "Idle",
            message if progressing else "",
            generation,
        ),
        _condition(
            "Stalled", stalled, reason if stalled else "NotStalled", message if stalled else "", generation
        ),
    ]
    before = {c.type: c for c in previous}
    for cond in fresh:
        old = before.get(cond.type)
        same = old is not None and old.status == cond.status and old.last_transition_time
        cond.last_transition_time = old.last_transition_time if same and old else format_time(now)
    return fresh


def backoff_due(failure: GroupFailure, delay_seconds: float, now: datetime) -> bool:
    seen = parse_time(failure.time)
    return seen is None or now >= seen + timedelta(seconds=delay_seconds)
