"""One reconcile of a PipelineJob, as a pure plan: (job, observed pods, now) -> what to apply, which pods
to delete, the new status and the Events. ``handlers.py`` gathers the inputs and ``k8s.py`` carries the
plan out, so every decision here is unit-tested without an API server.

The cases, in the order they are handled:
1. the spec does not validate -> Failed/InvalidSpec (not terminal: fixing the spec resumes);
2. finished (Succeeded, or Failed with its backoff spent) -> StatefulSets at 0 replicas, and after
   ``ttlSecondsAfterFinished`` the children are deleted (the PipelineJob and its status stay);
3. stages or tensorParallel changed while running -> refused, nothing touched (the CRD's CEL rules
   refuse it at admission too; this covers a CRD installed without them);
4. suspended -> StatefulSets at 0 replicas, restart counts kept; resuming continues from the checkpoint;
5. otherwise per group: failure -> backoff -> restart (all its pods replaced, CONVEYOR_RESTART + 1), or
   the backoffLimit is spent -> Failed; pods of an earlier restart -> deleted; pods of an older
   template -> rolled, one group at a time while every other group runs; then the job's phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from conveyor.spec import (
    GroupStatus,
    Mode,
    Phase,
    PipelineJobSpec,
    PipelineJobStatus,
    ResolvedSpec,
    SpecError,
    parse_spec,
)

from conveyor_operator import render
from conveyor_operator.backoff import budget_left, restart_delay
from conveyor_operator.observe import PodObservation, parse_time
from conveyor_operator.phase import (
    backoff_due,
    conditions,
    detect_failure,
    format_time,
    group_phase,
    job_phase,
    split_pods,
)
from conveyor_operator.progress import describe_resume, group_checkpoint, job_checkpoint
from conveyor_operator.restarts import account_group

TERMINAL_REASONS = {"BackoffLimitExceeded", "Completed"}
# A pod still terminating this long after its deletion deadline (deletionTimestamp: the request plus its
# grace period) is on a node that does not answer; the StatefulSet would wait for it forever. Forcing it
# lets the group restart on another node; should the node come back with its containers still running,
# they belong to an earlier generation and cannot join the new one's rendezvous (CONVEYOR_RENDEZVOUS).
STUCK_TERMINATING = timedelta(seconds=30)
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
    requeue_after: float | None = None


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


def _old_status(raw: dict[str, Any]) -> PipelineJobStatus:
    try:
        return PipelineJobStatus.model_validate(raw)
    except ValueError:
        return PipelineJobStatus()  # an unreadable status is rebuilt, not fatal


def _finish(plan: Plan, job: JobView, now: datetime) -> Plan:
    """Shared tail: conditions, a transition Event, observedGeneration."""
    st = plan.status
    st.observed_generation = job.generation
    old = _old_status(job.status)
    reason = st.reason or st.phase
    st.conditions = conditions(
        Phase(st.phase),
        reason=reason,
        message=st.message or "",
        generation=job.generation,
        previous=old.conditions,
        now=now,
        stalled=st.reason in STALLED_REASONS,
    )
    if old.phase != st.phase or not job.status:
        kind = "Warning" if st.phase == Phase.FAILED else "Normal"
        plan.events.append(Event(kind, str(st.phase), st.message or f"phase {st.phase}"))
    return plan


def plan_reconcile(
    job: JobView, pods: list[PodObservation], now: datetime, *, children_exist: bool = True
) -> Plan:
    plan = _plan(job, pods, now, children_exist)
    _release_stuck(plan, pods, now)
    return plan


def _release_stuck(plan: Plan, pods: list[PodObservation], now: datetime) -> None:
    """Force-delete the job's pods still terminating STUCK_TERMINATING past their deletion deadline, and
    come back when the next one would be."""
    for pod in pods:
        if not pod.listed or pod.deletion_deadline is None:
            continue
        wait = (pod.deletion_deadline + STUCK_TERMINATING - now).total_seconds()
        if wait <= 0:
            plan.force_delete_pods.append(pod.name)
            if pod.uid:
                plan.pod_uids[pod.name] = pod.uid
            plan.events.append(
                Event(
                    "Warning",
                    "PodForceDeleted",
                    f"pod {pod.name} still terminating {STUCK_TERMINATING.total_seconds():.0f}s after its grace "
                    "period (its node does not answer): deleted without waiting, so its StatefulSet can replace it",
                )
            )
        else:
            plan.requeue_after = min(plan.requeue_after or wait, wait)


def _plan(job: JobView, pods: list[PodObservation], now: datetime, children_exist: bool) -> Plan:
    old = _old_status(job.status)
    plan = Plan(status=old.model_copy(deep=True))
    st = plan.status
    st.start_time = st.start_time or format_time(now)

    try:
        spec = parse_spec(job.spec)
    except SpecError as err:
        st.phase, st.reason, st.message = Phase.FAILED, "InvalidSpec", str(err)
        return _finish(plan, job, now)

    ref = render.JobRef(job.name, job.namespace, job.uid)
    group_refs = render.groups(job.name, spec)
    restarts = {g.name: g.restarts for g in old.groups}
    checkpoints = {g.name: g.last_checkpoint for g in old.groups}
    _describe(st, spec, job.name, render.template_hash(spec))

    if st.phase in (Phase.SUCCEEDED, Phase.FAILED) and st.reason in TERMINAL_REASONS:
        return _finish(_plan_finished(plan, ref, spec, restarts, now, children_exist), job, now)

    if old.layout and old.phase != Phase.SUSPENDED and not spec.suspend:
        before = old.layout.split("x")[:2]
        after = [str(spec.parallelism.stages), str(spec.parallelism.tensor_parallel)]
        if before != after:
            st.layout = old.layout
            st.reason = "LayoutChangeRefused"
            st.message = (
                f"stages x tensorParallel changed from {'x'.join(before)} to {'x'.join(after)} while running: "
                "set suspend: true first (the job resumes from its checkpoint with the new layout) or revert"
            )
            plan.events.append(Event("Warning", "LayoutChangeRefused", st.message))
            return _finish(plan, job, now)

    if spec.suspend:
        st.phase, st.reason, st.message = Phase.SUSPENDED, "Suspended", "spec.suspend is true: pods stopped"
        st.groups = [
            GroupStatus(
                name=g.name,
                replica=g.replica,
                phase=Phase.SUSPENDED,
                restarts=restarts.get(g.name, 0),
                last_checkpoint=checkpoints.get(g.name),
            )
            for g in group_refs
        ]
        st.ready, st.ready_groups = f"0/{len(group_refs)}", 0
        plan.apply = render.build_all(ref, spec, restarts, running=False)
        return _finish(plan, job, now)

    return _finish(_plan_active(plan, old, ref, spec, group_refs, pods, now), job, now)


def _describe(st: PipelineJobStatus, spec: PipelineJobSpec, name: str, template_hash: str) -> None:
    st.layout = render.layout(spec)
    st.replicas = spec.parallelism.replicas
    st.selector = render.selector(name)
    groups = render.groups(name, spec)
    st.resolved = ResolvedSpec(
        gpus_per_pod=spec.gpus_per_pod,
        micro_batches=spec.parallelism.effective_micro_batches,
        pods_per_group=groups[0].pods if groups else spec.parallelism.stages,
        template_hash=template_hash,
    )


def _plan_finished(
    plan: Plan,
    ref: render.JobRef,
    spec: PipelineJobSpec,
    restarts: dict[str, int],
    now: datetime,
    children_exist: bool,
) -> Plan:
    st = plan.status
    done = parse_time(st.completion_time) or now
    ttl = spec.ttl_seconds_after_finished
    if ttl is not None and now >= done + timedelta(seconds=ttl):
        if children_exist:
            plan.delete_children = True
            plan.events.append(
                Event("Normal", "Cleaned", f"ttlSecondsAfterFinished ({ttl}s) passed: children deleted")
            )
        return plan
    plan.apply = render.build_all(ref, spec, restarts, running=False)
    if ttl is not None:
        plan.requeue_after = max(1.0, (done + timedelta(seconds=ttl) - now).total_seconds())
    return plan


def _plan_active(
    plan: Plan,
    old: PipelineJobStatus,
    ref: render.JobRef,
    spec: PipelineJobSpec,
    group_refs: list[render.GroupRef],
    pods: list[PodObservation],
    now: datetime,
) -> Plan:
    st = plan.status
    policy = spec.restart_policy
    thash = render.template_hash(spec)
    legacy = {render.legacy_template_hash(spec)}
    before = {g.name: g for g in old.groups}
    st.last_checkpoint = job_checkpoint(old.last_checkpoint, pods)
    st.reason = st.message = None
    exhausted: str | None = None

    new_groups: list[GroupStatus] = []
    split = {}
    for g in group_refs:
        prev = before.get(g.name)
        gs = GroupStatus(name=g.name, replica=g.replica)
        if prev is not None and prev.phase != Phase.SUSPENDED:
            gs = prev.model_copy(deep=True)
        elif prev is not None:
            # Resuming: a fresh start with the same restart count and the progress known so far.
            gs.restarts, gs.last_checkpoint = prev.restarts, prev.last_checkpoint
        gs.start_time = gs.start_time or format_time(now)
        gp = split_pods(pods, g.name, g.pods, gs.restarts, thash, same_template=legacy)
        # A train job's one group is the job: the job's record (from an older status, too) is its own.
        whole_job = st.last_checkpoint if g.replica is None else None
        gs.last_checkpoint = group_checkpoint(g.name, [gs.last_checkpoint, gs.resumed_from, whole_job], pods)
        split[g.name] = gp
        if prev is not None and prev.phase == Phase.SUCCEEDED:
            new_groups.append(gs)  # its work is committed: later noise from its pods changes nothing
            continue

        # The watermarks move on every reconcile, failure pending or not: an exit is accounted once.
        container_failure, gs.container_restarts = account_group(gp.live, gs.container_restarts)
        if gs.failure is None:
            gs.failure = detect_failure(
                gp,
                g.pods,
                start_time=parse_time(gs.start_time),
                running_since=parse_time(gs.running_since),
                members_since=parse_time(gs.members_since),
                policy=policy,
                now=now,
                container_failure=container_failure,
            )
            if gs.failure is not None:
                plan.events.append(
                    Event("Warning", gs.failure.reason, f"group {g.name}: {gs.failure.message}")
                )
        restarted = False
        if gs.failure is not None:
            if not budget_left(policy, st.restarts):
                exhausted = f"group {g.name}: {gs.failure.reason}: {gs.failure.message}"
            else:
                delay = restart_delay(policy, gs.restarts)
                if backoff_due(gs.failure, delay, now):
                    _restart_group(plan, gs, gp, st, policy.backoff_limit, now)
                    restarted = True
                else:
                    due = parse_time(gs.failure.time)
                    wait = delay - (now - due).total_seconds() if due else delay
                    plan.requeue_after = min(plan.requeue_after or wait, wait)
        else:
            _delete(plan, gp.previous)

        failing = restarted or gs.failure is not None
        gs.phase = Phase.RESTARTING if failing else group_phase(gp, g.pods, failing=False)
        if (
            prev is not None
            and prev.phase == Phase.RESTARTING
            and gs.phase in (Phase.PENDING, Phase.STARTING)
        ):
            gs.phase = Phase.RESTARTING  # a restarted group is Restarting until it runs again
        if gs.phase == Phase.RUNNING and gs.running_since is None:
            gs.running_since = format_time(now)
            created = [p.created for p in gp.live if p.created is not None]
            gs.members_since = format_time(max(created)) if created else None
        gs.pods = len(gp.live)
        gs.ready_pods = sum(p.ready for p in gp.live)
        for pod in gp.live:
            wanted = render.pod_stage_labels(spec, g, pod.index)
            if any(pod.labels.get(k) != v for k, v in wanted.items()):
                plan.label_pods[pod.name] = wanted
        new_groups.append(gs)

    _roll_one_group(plan, new_groups, split, now)
    desired = {g.name for g in group_refs}
    plan.delete_statefulsets = [g.name for g in old.groups if g.name not in desired]
    st.groups = new_groups
    ready = sum(g.phase in (Phase.RUNNING, Phase.SUCCEEDED) for g in new_groups)
    st.ready, st.ready_groups = f"{ready}/{len(new_groups)}", ready
    restarts = {g.name: g.restarts for g in new_groups}

    if exhausted is not None:
        st.phase, st.reason = Phase.FAILED, "BackoffLimitExceeded"
        st.message = f"backoffLimit ({policy.backoff_limit}) restarts spent; last failure: {exhausted}"
    else:
        st.phase = job_phase([Phase(g.phase) for g in new_groups], completes=spec.mode != Mode.SERVE)
        if st.phase == Phase.SUCCEEDED:
            st.reason, st.message = "Completed", "every group finished its work"
        elif st.phase == Phase.RESTARTING:
            failed = [g.failure for g in new_groups if g.failure is not None]
            st.reason = failed[0].reason if failed else "GroupRestarted"
            restarting = sum(g.phase == Phase.RESTARTING for g in new_groups)
            st.message = f"{restarting} of {len(new_groups)} groups restarting"
        else:
            st.message = f"{ready} of {len(new_groups)} groups ready"
    finished = st.phase in (Phase.SUCCEEDED, Phase.FAILED)
    if finished:
        st.completion_time = format_time(now)
        plan.delete_pods = []
        if spec.ttl_seconds_after_finished is not None:
            plan.requeue_after = float(max(1, spec.ttl_seconds_after_finished))
    plan.apply = render.build_all(ref, spec, restarts, running=not finished)
    return plan


def _delete(plan: Plan, pods: list[PodObservation]) -> None:
    for pod in pods:
        plan.delete_pods.append(pod.name)
        if pod.uid:
            plan.pod_uids[pod.name] = pod.uid


def _restart_group(
    plan: Plan, gs: GroupStatus, gp: Any, st: PipelineJobStatus, limit: int, now: datetime
) -> None:
    """Replace every pod of the group at once with CONVEYOR_RESTART + 1: all ranks rendezvous again and
    resume from the latest committed checkpoint."""
    failure = gs.failure
    assert failure is not None
    gs.restarts += 1
    st.restarts += 1
    gs.failure = None
    gs.start_time, gs.running_since, gs.members_since = format_time(now), None, None
    gs.resumed_from = gs.last_checkpoint
    gs.container_restarts = []  # the new generation's pods start counting from 0
    _delete(plan, gp.current + gp.previous + gp.outdated)
    plan.restarts.append(gs.name)
    plan.events.append(
        Event(
            "Warning",
            "GroupRestarted",
            f"group {gs.name} restart {gs.restarts} (job restarts {st.restarts}/{limit}) after {failure.reason}: "
            f"{failure.message}; resuming from {describe_resume(gs.last_checkpoint)}",
        )
    )


def _roll_one_group(plan: Plan, groups: list[GroupStatus], split: dict[str, Any], now: datetime) -> None:
    """A spec change that keeps the layout: replace one group's outdated pods, and only while every other
    group is ready, so a serve job keeps serving."""
    candidates = [
        g for g in groups if split[g.name].outdated and g.failure is None and g.phase != Phase.RESTARTING
    ]
    if not candidates:
        return
    others_ready = all(
        g.phase in (Phase.RUNNING, Phase.SUCCEEDED) for g in groups if g.name != candidates[0].name
    )
    if not others_ready:
        return
    target = candidates[0]
    _delete(plan, split[target.name].outdated)
    target.start_time, target.running_since, target.members_since = format_time(now), None, None
    target.phase = Phase.STARTING
    plan.events.append(
        Event("Normal", "GroupRolled", f"group {target.name}: rolling to the new pod template")
    )
