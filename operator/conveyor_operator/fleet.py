"""A serve job's fleet (pure): which groups exist beyond spec replicas, which entry pods the Service
selects, how a new spec rolls group by group, and how a scale-down drains.

Groups are `NAME-r{i}`; `i < replicas` are the regular replicas. Beyond them live, for a while:
- surge replicas `r{replicas}..r{replicas+surge-1}` of a rollout, started with the new template;
- groups scaled away or a rollout's surge after it finished, draining until they are deleted (a scaled-away
  group that serves is taken out only within the availability budget, as the rollout's groups are).

The Service selects the entry pod (stage 0) of a group only while the group serves: every pod of it is
ready (``Phase.RUNNING``), it has no failure waiting, and it is not draining. Taking a group out is a label
change on its entry pod (SERVING_LABEL); the group's pods are stopped ``drainSeconds`` later, when the
endpoints no longer send to it, and the worker finishes its in-flight requests on SIGTERM.

A rollout (some regular group runs an older template), as in LeaderWorkerSet:
1. it starts: with ``maxSurge`` > 0 the surge replicas are asked for (Surge; at most ``replicas`` of them),
   else it goes InPlace;
2. surge pods not all scheduled SURGE_SCHEDULE_SECONDS after they were asked for (or, once placed, after a
   surge group restarted or a scale-up asked for another): the cluster has no room, they are dropped and
   the rollout goes InPlace;
3. outdated regular groups are taken out, highest index first, while the serving groups that remain are
   at least ``replicas - maxUnavailable`` (InPlace: ``maxUnavailable`` at least 1, or it could never move);
   a group that is not serving anyway is replaced at once, unless it is restarting after a failure: its
   restart replaces every pod with the new template, and a roll too would replace them twice;
4. a taken-out group's outdated pods are deleted once its drain time passed; the StatefulSet recreates
   them with the new template;
5. every regular group on the new template and serving: the surge replicas drain and go, the rollout ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from conveyor.job_status import DrainingGroup, FleetStatus, GroupStatus, Phase, PipelineJobStatus
from conveyor.spec import PipelineJobSpec

from conveyor_operator import render
from conveyor_operator.observe import parse_time
from conveyor_operator.phase import GroupPods, format_time, job_phase

# Surge pods still unscheduled this long after they were asked for: no room in the cluster, go in place.
SURGE_SCHEDULE_SECONDS = 60


@dataclass(frozen=True)
class FleetEvent:
    type: str
    reason: str
    message: str


def scale_selector(name: str) -> str:
    """status.selector of a serve job (the scale subresource's labelSelector): its entry pods, one per
    replica, the pods that export the serve metrics an HPA or KEDA scales on (queue depth, running)."""
    return f"{render.selector(name)},{render.STAGE_LABEL}=0"


def _drain_seconds(spec: PipelineJobSpec) -> int:
    return spec.serve.rollout.drain_seconds if spec.serve is not None else 0


def _drained(entry: DrainingGroup, spec: PipelineJobSpec, now: datetime) -> bool:
    since = parse_time(entry.since)
    return since is None or now >= since + timedelta(seconds=_drain_seconds(spec))


def _max_surge(spec: PipelineJobSpec) -> int:
    """Never more surge replicas than replicas, as a Deployment and LeaderWorkerSet: one new template for
    each of them is all a rollout can use, and a larger maxSurge stays valid after a scale-down."""
    rollout = spec.serve.rollout if spec.serve is not None else None
    return min(rollout.max_surge, spec.parallelism.replicas) if rollout else 0


def _surge_replicas(spec: PipelineJobSpec, fleet: FleetStatus) -> int:
    """The running rollout's surge replicas under the spec's replicas now: replicas scaled down in the
    middle of a rollout shrink the surge with them (the groups past it drain away)."""
    return min(fleet.surge_replicas, _max_surge(spec))


def extra_groups(
    name: str, spec: PipelineJobSpec, old: PipelineJobStatus, now: datetime
) -> list[render.GroupRef]:
    """Groups beyond spec replicas that still exist: the rollout's surge replicas, and groups draining
    whose time has not passed (a drained group is left out, so the reconcile deletes its StatefulSet)."""
    fleet = old.fleet or FleetStatus()
    replicas, stages = spec.parallelism.replicas, spec.parallelism.stages
    surge_replicas = _surge_replicas(spec, fleet)
    surge = {f"{name}-r{i}" for i in range(replicas, replicas + surge_replicas)}
    draining = {d.name: d for d in fleet.draining}
    out = []
    for group in old.groups:
        if group.replica is None or group.replica < replicas:
            continue
        entry = draining.get(group.name)
        if group.name in surge or entry is None or not _drained(entry, spec, now):
            out.append(render.GroupRef(name=group.name, replica=group.replica, pods=stages))
    known = {g.name for g in out}
    # asked for, not yet in status.groups: the surge now, and the one the last reconcile asked for under
    # the replicas then (past the surge now, it is tracked so that it drains and goes)
    before = range(old.replicas, old.replicas + fleet.surge_replicas)
    for i in sorted({*range(replicas, replicas + surge_replicas), *before}):
        if i >= replicas and f"{name}-r{i}" not in known:
            out.append(render.GroupRef(name=f"{name}-r{i}", replica=i, pods=stages))
    return sorted(out, key=lambda g: g.replica or 0)


@dataclass
class FleetPlan:
    """What the fleet step decided, for reconcile.py to merge into its Plan."""

    fleet: FleetStatus
    labels: dict[str, dict[str, str]]  # pod -> labels to set
    roll: list[str]  # groups whose outdated pods are deleted now (rolled to the new template)
    surge_groups: list[render.GroupRef]  # StatefulSets to apply beyond spec replicas
    phase: Phase | None  # the job's phase from its regular replicas (None: leave the phase as it is)
    ready: str
    events: list[FleetEvent]
    requeue_after: float | None = None


def _serving(group: GroupStatus, draining: set[str]) -> bool:
    return group.phase == Phase.RUNNING and group.failure is None and group.name not in draining


def plan_fleet(
    name: str,
    spec: PipelineJobSpec,
    old: FleetStatus | None,
    groups: list[GroupStatus],
    members_of: dict[str, GroupPods],
    now: datetime,
) -> FleetPlan:
    """One reconcile's fleet decisions, from the groups as this reconcile observed them (their phase after
    failures and restarts were handled)."""
    rollout = spec.serve.rollout if spec.serve is not None else None
    replicas = spec.parallelism.replicas
    max_surge = _max_surge(spec)
    max_unavailable = rollout.max_unavailable if rollout else 0
    fleet = (old or FleetStatus()).model_copy(deep=True)
    fleet.surge_replicas = _surge_replicas(spec, fleet)
    events: list[FleetEvent] = []
    regular = [g for g in groups if g.replica is not None and g.replica < replicas]
    outdated = [g for g in regular if members_of[g.name].outdated]
    if outdated and fleet.strategy is None:
        fleet.strategy = "Surge" if max_surge > 0 else "InPlace"
        if fleet.strategy == "Surge":
            fleet.surge_replicas, fleet.surge_since = max_surge, format_time(now)
        events.append(
            FleetEvent(
                "Normal",
                "RolloutStarted",
                f"rolling {len(outdated)} of {replicas} replicas ({fleet.strategy})",
            )
        )
    surge_names = {f"{name}-r{i}" for i in range(replicas, replicas + fleet.surge_replicas)}

    # A group scaled away and then wanted again before its drain ended (replicas scaled back up, or its
    # place is the surge's now) serves on; one taken out to roll is rolled below.
    wanted = {g.name for g in regular} | surge_names
    present = {g.name for g in groups}
    fleet.draining = [
        d for d in fleet.draining if d.name in present and not (d.reason == "ScaleDown" and d.name in wanted)
    ]
    draining = {d.name for d in fleet.draining}

    def drain(group: GroupStatus, reason: str) -> None:
        fleet.draining.append(DrainingGroup(name=group.name, since=format_time(now), reason=reason))  # type: ignore[arg-type]
        draining.add(group.name)

    requeue: float | None = None
    surge = [g for g in groups if g.name in surge_names]
    if fleet.strategy == "Surge" and fleet.surge_replicas:
        # every pod there and on a node (GroupStatus.pods counts the pods that exist: not the size)
        size = spec.parallelism.stages
        scheduled = (
            all(
                len(members_of[g.name].live) == size and all(p.scheduled for p in members_of[g.name].live)
                for g in surge
            )
            and len(surge) == fleet.surge_replicas
        )
        # The clock runs while a surge group waits for room: once all are placed it stops, so a surge group
        # asked for after a scale-up, or restarting after a failure, gets its own SURGE_SCHEDULE_SECONDS.
        asked = now if scheduled else parse_time(fleet.surge_since) or now
        fleet.surge_since = None if scheduled else format_time(asked)
        if not scheduled and now >= asked + timedelta(seconds=SURGE_SCHEDULE_SECONDS):
            events.append(
                FleetEvent(
                    "Warning",
                    "RolloutInPlace",
                    f"{fleet.surge_replicas} surge replicas not all scheduled within {SURGE_SCHEDULE_SECONDS}s "
                    "(no room in the cluster): rolling in place",
                )
            )
            fleet.strategy, fleet.surge_replicas, fleet.surge_since = "InPlace", 0, None
            for g in surge:
                drain(g, "Rollout")
            surge, surge_names = [], set()
        elif not scheduled:
            requeue = (asked + timedelta(seconds=SURGE_SCHEDULE_SECONDS) - now).total_seconds()

    # Rolled groups whose drain passed: their outdated pods go, the StatefulSet brings the new template.
    roll = []
    for entry in list(fleet.draining):
        group = next(g for g in groups if g.name == entry.name)
        if entry.reason != "Rollout" or group.replica is None:
            continue
        if group.replica >= replicas and group.name not in surge_names:
            continue  # a finished surge: deleted with its StatefulSet
        if _drained(entry, spec, now):
            if group.phase != Phase.RESTARTING:  # a restart replaces every pod, with the new template
                roll.append(group.name)
            fleet.draining.remove(entry)
            draining.discard(group.name)
        else:
            requeue = min(requeue or 1e9, _drain_seconds(spec))

    # The availability budget: serving groups stay at least replicas - maxUnavailable whatever is taken out.
    unavailable = max(1, max_unavailable) if fleet.strategy == "InPlace" else max_unavailable
    # a group rolled by this reconcile loses its pods now, whatever phase it was observed in
    serving = sum(_serving(g, draining) and g.name not in roll for g in groups)

    # Scaled away (beyond the regular replicas and the surge): out of the Service, then deleted, highest
    # index first; one that serves stays while the replicas that remain do not serve enough yet.
    for group in sorted(groups, key=lambda g: -(g.replica or 0)):
        beyond = group.replica is not None and group.replica >= replicas
        if not beyond or group.name in surge_names or group.name in draining:
            continue
        if _serving(group, draining):
            if serving - 1 < replicas - unavailable:
                continue
            serving -= 1
        drain(group, "ScaleDown")
        events.append(FleetEvent("Normal", "ScaleDown", f"group {group.name}: draining, then removed"))

    # Take out outdated regular groups, highest index first, within the availability budget.
    if fleet.strategy is not None:
        for group in sorted(outdated, key=lambda g: -(g.replica or 0)):
            if group.name in draining or group.name in roll:
                continue
            if group.phase == Phase.RESTARTING:
                continue  # its restart (now, or when its backoff ends) replaces every pod, with the new template
            if not _serving(group, draining):
                roll.append(group.name)  # not serving anyway: replaced at once
            elif serving - 1 >= replicas - unavailable:
                drain(group, "Rollout")
                serving -= 1
                requeue = min(requeue or 1e9, _drain_seconds(spec))

    # Done: every regular replica on the new template and serving (running is not enough: one taken out to
    # roll may be back on the new template by a restart while its drain has not passed yet).
    updated = [g for g in regular if not members_of[g.name].outdated and g.name not in roll]
    if (
        fleet.strategy is not None
        and len(updated) == replicas
        and all(_serving(g, draining) for g in updated)
    ):
        for g in surge:
            if g.name not in draining:
                drain(g, "Rollout")
        events.append(FleetEvent("Normal", "RolloutDone", f"{replicas} replicas on the new template"))
        fleet.strategy, fleet.surge_replicas, fleet.surge_since = None, 0, None
        surge_names = set()

    labels: dict[str, dict[str, str]] = {}
    for group in groups:
        want = "true" if _serving(group, draining) and group.name not in roll else "false"
        for pod in members_of[group.name].live:
            if pod.index == 0 and pod.labels.get(render.SERVING_LABEL) != want:
                labels[pod.name] = {render.SERVING_LABEL: want}

    ready = sum(g.phase == Phase.RUNNING for g in regular)
    fleet.ready_replicas = ready
    fleet.serving_replicas = sum(_serving(g, draining) and g.name not in roll for g in groups)
    fleet.updated_replicas = len(updated)
    fleet.message = _message(fleet, replicas)
    surge_refs = [
        render.GroupRef(name=f"{name}-r{i}", replica=i, pods=spec.parallelism.stages)
        for i in range(replicas, replicas + fleet.surge_replicas)
    ]
    phases = [Phase(g.phase) for g in regular if g.name not in roll]
    phases += [Phase.STARTING for g in regular if g.name in roll]
    return FleetPlan(
        fleet=fleet,
        labels=labels,
        roll=roll,
        surge_groups=surge_refs,
        phase=job_phase(phases, completes=False),
        ready=f"{ready}/{replicas}",
        events=events,
        requeue_after=requeue,
    )


def _message(fleet: FleetStatus, replicas: int) -> str:
    text = f"{fleet.ready_replicas}/{replicas} replicas ready, {fleet.serving_replicas} serving"
    if fleet.strategy is not None:
        surge = f", {fleet.surge_replicas} surge" if fleet.surge_replicas else ""
        text += f"; rolling ({fleet.strategy}{surge}): {fleet.updated_replicas}/{replicas} updated"
    if fleet.draining:
        text += f"; draining {', '.join(d.name for d in fleet.draining)}"
    return text
