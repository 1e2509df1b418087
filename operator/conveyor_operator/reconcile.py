"""One reconcile of a PipelineJob, as a pure plan: (job, observed pods, now) -> what to apply, which pods
to delete, the new status and the Events. ``handlers.py`` gathers the inputs and ``k8s.py`` carries the
plan out, so every decision here is unit-tested without an API server. The Plan and its shared tail are
``plan.py``.

The cases, in the order they are handled:
1. the spec does not validate, or its template reuses a key of the operator's own rendering (an env
   var, a volume name, a mount path: template_clashes.py, the backstop of the spec model's check), or an inference job's output would die with
   its pods (results_storage.py) -> Failed/InvalidSpec (not terminal: fixing the spec resumes); the API
   server refused one of its objects (``refused_by_the_api_server``) -> Failed/ApplyRefused, kept with
   nothing applied until the spec or its rendering changes;
2. finished (Succeeded, or Failed with its backoff spent) -> StatefulSets at 0 replicas, and after
   ``ttlSecondsAfterFinished`` the children are deleted (the PipelineJob and its status stay);
3. stages or tensorParallel changed while running -> refused, nothing touched (the CRD's CEL rules
   refuse it at admission too; this covers a CRD installed without them);
4. suspended -> StatefulSets at 0 replicas, restart counts kept; resuming continues from the checkpoint;
5. otherwise per group: failure -> backoff -> restart (all its pods replaced, CONVEYOR_RESTART + 1), or
   the backoffLimit is spent -> Failed (group_failure.py); pods of an earlier restart -> deleted; pods of an older
   template -> rolled, one group at a time while every other group runs; then the job's phase.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from conveyor.job_status import CheckpointRef, GroupStatus, Phase, PipelineJobStatus, ResolvedSpec
from conveyor.spec import Mode, PipelineJobSpec, SpecError, parse_spec

from conveyor_operator import fleet, group_failure, problems, render
from conveyor_operator.observe import PodObservation, parse_time
from conveyor_operator.phase import GroupPods, format_time, group_phase, job_phase, split_pods
from conveyor_operator.plan import Event, JobView, Plan, finish, old_status
from conveyor_operator.progress import group_checkpoint, job_checkpoint, newest, skip_event
from conveyor_operator.results_storage import results_lost_with_the_pod
from conveyor_operator.template_clashes import template_clashes

TERMINAL_REASONS = {"BackoffLimitExceeded", "Completed"}
APPLY_REFUSED = "ApplyRefused"
# A pod still terminating this long after its deletion deadline (deletionTimestamp: the request plus its
# grace period) is on a node that does not answer; the StatefulSet would wait for it forever. Forcing it
# lets the group restart on another node; should the node come back with its containers still running,
# they belong to an earlier generation and cannot join the new one's rendezvous (CONVEYOR_RENDEZVOUS).
STUCK_TERMINATING = timedelta(seconds=30)


def plan_reconcile(
    job: JobView,
    pods: list[PodObservation],
    now: datetime,
    *,
    children_exist: bool = True,
    live_checkpoint: CheckpointRef | None = None,
) -> Plan:
    """``live_checkpoint``: what a running rank 0 reports in its metrics (scrape.py), if anything."""
    plan = _plan(job, pods, now, children_exist, live_checkpoint)
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


def _plan(
    job: JobView, pods: list[PodObservation], now: datetime, children_exist: bool, live: CheckpointRef | None
) -> Plan:
    old = old_status(job.status)
    plan = Plan(status=old.model_copy(deep=True))
    status = plan.status
    status.start_time = status.start_time or format_time(now)

    try:
        spec = parse_spec(job.spec)
    except SpecError as err:
        status.phase, status.reason, status.message = Phase.FAILED, "InvalidSpec", str(err)
        return finish(plan, job, now)
    # valid, but every apply of its StatefulSets would be refused, or its results lost with its pods
    problems = template_clashes(spec) + results_lost_with_the_pod(spec)
    if problems:
        status.phase, status.reason, status.message = Phase.FAILED, "InvalidSpec", "\n".join(problems)
        return finish(plan, job, now)

    ref = render.JobRef(job.name, job.namespace, job.uid)
    group_refs = render.groups(job.name, spec)
    restarts = {g.name: g.restarts for g in old.groups}
    checkpoints = {g.name: g.last_checkpoint for g in old.groups}
    _describe(status, spec, job.name, render.template_hash(spec))
    if _still_refused(old, status, job):
        return finish(plan, job, now)  # the same objects would be refused again: wait for a new spec

    if status.phase in (Phase.SUCCEEDED, Phase.FAILED) and status.reason in TERMINAL_REASONS:
        return finish(_plan_finished(plan, ref, spec, restarts, now, children_exist), job, now)

    refused = _layout_change_refused(old, spec)
    if refused is not None:
        status.layout, status.reason, status.message = old.layout, "LayoutChangeRefused", refused
        plan.events.append(Event("Warning", "LayoutChangeRefused", refused))
        return finish(plan, job, now)

    if spec.suspend:
        status.phase, status.reason = Phase.SUSPENDED, "Suspended"
        status.message = "spec.suspend is true: pods stopped"
        status.groups = [
            GroupStatus(
                name=g.name,
                replica=g.replica,
                phase=Phase.SUSPENDED,
                restarts=restarts.get(g.name, 0),
                last_checkpoint=checkpoints.get(g.name),
            )
            for g in group_refs
        ]
        status.ready, status.ready_groups = f"0/{len(group_refs)}", 0
        plan.apply = render.build_all(ref, spec, restarts, running=False)
        if spec.mode == Mode.SERVE:  # a rollout's surge and draining groups go; resuming starts afresh
            regular = {g.name for g in group_refs}
            plan.delete_statefulsets = [g.name for g in old.groups if g.name not in regular]
            status.fleet = None
        return finish(plan, job, now)

    if spec.mode == Mode.SERVE:
        group_refs += fleet.extra_groups(job.name, spec, old, now)  # surge replicas, groups draining
    return finish(_plan_active(plan, old, ref, spec, group_refs, pods, now, live), job, now)


def refused_by_the_api_server(
    job: JobView, status: PipelineJobStatus, obj: dict[str, Any], message: str, now: datetime
) -> Plan:
    """The plan after the API server refused one of the job's objects as invalid (``k8s.refusal``): the
    job is Failed with reason ApplyRefused and the server's words, and nothing more is applied. Until the
    spec (its generation) or the operator's rendering of it (the template hash) changes, the next
    reconciles keep it so (``_still_refused``) instead of failing the same apply every resync."""
    plan = Plan(status=status.model_copy(deep=True))
    what = f"{obj['kind']} {obj['metadata']['name']}"
    plan.status.phase, plan.status.reason = Phase.FAILED, APPLY_REFUSED
    plan.status.message = (
        f"the API server refused {what}: {message}; fix the spec (usually spec.template or spec.resources) "
        "and apply it again"
    )
    return finish(plan, job, now)  # (its Warning Event: the transition to Failed, with the message)


def _still_refused(old: PipelineJobStatus, new: PipelineJobStatus, job: JobView) -> bool:
    if old.reason != APPLY_REFUSED or old.observed_generation != job.generation:
        return False
    rendered = (
        old.resolved.template_hash if old.resolved else None,
        new.resolved.template_hash if new.resolved else None,
    )
    return rendered[0] == rendered[1]


def _layout_change_refused(old: PipelineJobStatus, spec: PipelineJobSpec) -> str | None:
    """Why a running job's new stages x tensorParallel is refused, or None: ranks of one layout cannot
    resume another's pipeline while they run (a suspended job may change it)."""
    if not old.layout or old.phase == Phase.SUSPENDED or spec.suspend:
        return None
    before = old.layout.split("x")[:2]
    after = [str(spec.parallelism.stages), str(spec.parallelism.tensor_parallel)]
    if before == after:
        return None
    return (
        f"stages x tensorParallel changed from {'x'.join(before)} to {'x'.join(after)} while running: "
        "set suspend: true first (the job resumes from its checkpoint with the new layout) or revert"
    )


def _describe(status: PipelineJobStatus, spec: PipelineJobSpec, name: str, template_hash: str) -> None:
    status.layout = render.layout(spec)
    status.replicas = spec.parallelism.replicas
    status.selector = fleet.scale_selector(name) if spec.mode == Mode.SERVE else render.selector(name)
    groups = render.groups(name, spec)
    status.resolved = ResolvedSpec(
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
    done = parse_time(plan.status.completion_time) or now
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
    live: CheckpointRef | None = None,
) -> Plan:
    """Each group through failure, restart and its pods' state; one group rolled to a new template; then
    the job's phase from its groups'."""
    status = plan.status
    template_hash = render.template_hash(spec)
    before = {g.name: g for g in old.groups}
    status.last_checkpoint = newest([job_checkpoint(old.last_checkpoint, pods), live])
    skipped = skip_event(old.last_checkpoint, status.last_checkpoint)
    if skipped is not None:
        plan.events.append(Event("Warning", "CheckpointSkipped", skipped))
    status.reason = status.message = None
    exhausted: str | None = None  # the last failure that found the backoffLimit spent

    groups: list[GroupStatus] = []
    members_of: dict[str, GroupPods] = {}
    for group in group_refs:
        previous = before.get(group.name)
        group_status = _carried_over(previous, group, now)
        members = split_pods(pods, group.name, group.pods, group_status.restarts, template_hash)
        members_of[group.name] = members
        # A train job's one group is the job: the job's record (from an older status, too) is its own.
        whole_job = status.last_checkpoint if group.replica is None else None
        group_status.last_checkpoint = group_checkpoint(
            group.name, [group_status.last_checkpoint, group_status.resumed_from, whole_job], pods
        )
        groups.append(group_status)
        if previous is not None and previous.phase == Phase.SUCCEEDED:
            continue  # its work is committed: later noise from its pods changes nothing
        restarted, spent = group_failure.handle_failure(
            plan, group_status, members, group, spec.restart_policy, now, spec.failure_policy
        )
        exhausted = spent or exhausted
        _observe_members(plan, group_status, members, group, spec, previous, restarted, now)

    if spec.mode != Mode.SERVE:
        _roll_one_group(plan, groups, members_of, now)
    desired = {g.name for g in group_refs}
    plan.delete_statefulsets = [g.name for g in old.groups if g.name not in desired]
    status.groups = groups
    _job_outcome(plan, spec, exhausted, now)
    plan.problems, wait = problems.report(status, old, spec, members_of, now)
    if wait is not None:
        plan.requeue_after = min(plan.requeue_after or wait, wait)
    restarts = {g.name: g.restarts for g in groups}
    finished = status.phase in (Phase.SUCCEEDED, Phase.FAILED)
    plan.apply = render.build_all(ref, spec, restarts, running=not finished)
    if spec.mode == Mode.SERVE and not finished:
        _serve_fleet(plan, old, ref, spec, members_of, now)
    return plan


def _serve_fleet(
    plan: Plan,
    old: PipelineJobStatus,
    ref: render.JobRef,
    spec: PipelineJobSpec,
    members_of: dict[str, GroupPods],
    now: datetime,
) -> None:
    """Merge the fleet's decisions (fleet.py) into the plan: Service labels, groups rolled, surge
    StatefulSets, the phase from the regular replicas."""
    status = plan.status
    decided = fleet.plan_fleet(ref.name, spec, old.fleet, status.groups, members_of, now)
    status.fleet = decided.fleet
    for pod, labels in decided.labels.items():
        plan.label_pods[pod] = {**plan.label_pods.get(pod, {}), **labels}
    for group in status.groups:
        outdated = members_of[group.name].outdated
        if group.name in decided.roll and outdated:
            plan.delete(outdated)
            group.start_time, group.running_since, group.members_since = format_time(now), None, None
            group.phase = Phase.STARTING
            plan.events.append(
                Event("Normal", "GroupRolled", f"group {group.name}: rolling to the new pod template")
            )
    restarts = {g.name: g.restarts for g in status.groups}
    plan.apply += render.build_podgroups(ref, spec, decided.surge_groups)
    plan.apply += [
        render.build_statefulset(ref, spec, g, restart=restarts.get(g.name, 0), running=True)
        for g in decided.surge_groups
    ]
    plan.delete_statefulsets.sort(key=lambda n: -int(n.rsplit("-r", 1)[-1]) if "-r" in n else 0)
    plan.events += [Event(e.type, e.reason, e.message) for e in decided.events]
    if decided.requeue_after is not None:
        plan.requeue_after = min(plan.requeue_after or decided.requeue_after, decided.requeue_after)
    if status.phase != Phase.FAILED and decided.phase is not None:
        status.phase = (
            decided.phase
        )  # from the regular replicas: a surge or draining group's state is not the job's
        if status.phase != Phase.RESTARTING:
            status.reason = None
    status.ready = decided.ready
    status.ready_groups = decided.fleet.ready_replicas
    if status.reason is None:
        status.message = decided.fleet.message


def _carried_over(previous: GroupStatus | None, group: render.GroupRef, now: datetime) -> GroupStatus:
    """The group's status as the last reconcile left it; after a suspension a fresh start that keeps the
    restart count and the progress known so far."""
    group_status = GroupStatus(name=group.name, replica=group.replica)
    if previous is not None and previous.phase != Phase.SUSPENDED:
        group_status = previous.model_copy(deep=True)
    elif previous is not None:
        group_status.restarts, group_status.last_checkpoint = previous.restarts, previous.last_checkpoint
    group_status.start_time = group_status.start_time or format_time(now)
    return group_status


def _observe_members(
    plan: Plan,
    group_status: GroupStatus,
    members: GroupPods,
    group: render.GroupRef,
    spec: PipelineJobSpec,
    previous: GroupStatus | None,
    restarted: bool,
    now: datetime,
) -> None:
    """The group's phase and pod counts from its members, and the stage labels they lack."""
    failing = restarted or group_status.failure is not None
    group_status.phase = Phase.RESTARTING if failing else group_phase(members, group.pods, failing=False)
    if (
        previous is not None
        and previous.phase == Phase.RESTARTING
        and group_status.phase in (Phase.PENDING, Phase.STARTING)
    ):
        group_status.phase = Phase.RESTARTING  # a restarted group is Restarting until it runs again
    if group_status.phase == Phase.RUNNING and group_status.running_since is None:
        group_status.running_since = format_time(now)
        created = [p.created for p in members.live if p.created is not None]
        group_status.members_since = format_time(max(created)) if created else None
    group_status.pods = len(members.live)
    group_status.ready_pods = sum(p.ready for p in members.live)
    for pod in members.live:
        wanted = render.pod_stage_labels(spec, group, pod.index)
        if any(pod.labels.get(k) != v for k, v in wanted.items()):
            plan.label_pods[pod.name] = wanted


def _job_outcome(plan: Plan, spec: PipelineJobSpec, exhausted: str | None, now: datetime) -> None:
    """The job's phase, reason and message from its groups' (status.groups), and what finishing means."""
    status = plan.status
    groups = status.groups
    ready = sum(g.phase in (Phase.RUNNING, Phase.SUCCEEDED) for g in groups)
    status.ready, status.ready_groups = f"{ready}/{len(groups)}", ready
    if plan.fatal is not None:
        status.phase, status.reason = Phase.FAILED, "FailedByRule"
        status.message = f"failurePolicy fails the job: {plan.fatal}"
    elif exhausted is not None:
        status.phase, status.reason = Phase.FAILED, "BackoffLimitExceeded"
        status.message = (
            f"backoffLimit ({spec.restart_policy.backoff_limit}) restarts spent; last failure: {exhausted}"
        )
    else:
        status.phase = job_phase([Phase(g.phase) for g in groups], completes=spec.mode != Mode.SERVE)
        if status.phase == Phase.SUCCEEDED:
            status.reason, status.message = "Completed", "every group finished its work"
        elif status.phase == Phase.RESTARTING:
            failed = [g.failure for g in groups if g.failure is not None]
            status.reason = failed[0].reason if failed else "GroupRestarted"
            restarting = sum(g.phase == Phase.RESTARTING for g in groups)
            status.message = f"{restarting} of {len(groups)} groups restarting"
        else:
            status.message = f"{ready} of {len(groups)} groups ready"
    if status.phase in (Phase.SUCCEEDED, Phase.FAILED):
        status.completion_time = format_time(now)
        plan.delete_pods = []
        if spec.ttl_seconds_after_finished is not None:
            plan.requeue_after = float(max(1, spec.ttl_seconds_after_finished))


def _roll_one_group(
    plan: Plan, groups: list[GroupStatus], members_of: dict[str, GroupPods], now: datetime
) -> None:
    """A spec change that keeps the layout: replace one group's outdated pods, and only while every other
    group is ready, so a serve job keeps serving."""
    candidates = [
        g for g in groups if members_of[g.name].outdated and g.failure is None and g.phase != Phase.RESTARTING
    ]
    if not candidates:
        return
    others_ready = all(
        g.phase in (Phase.RUNNING, Phase.SUCCEEDED) for g in groups if g.name != candidates[0].name
    )
    if not others_ready:
        return
    target = candidates[0]
    plan.delete(members_of[target.name].outdated)
    target.start_time, target.running_since, target.members_since = format_time(now), None, None
    target.phase = Phase.STARTING
    plan.events.append(
        Event("Normal", "GroupRolled", f"group {target.name}: rolling to the new pod template")
    )
