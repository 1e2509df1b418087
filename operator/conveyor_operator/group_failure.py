"""A group's failure, as a pure step of the reconcile: its container exits accounted (restarts.py), a
failure detected (phase.py), judged by the failurePolicy's rules (failure_rules.py), and then ignored, fatal
to the job, or a restart of the whole group once its backoff is due and while the backoffLimit lasts."""

from __future__ import annotations

from datetime import datetime

from conveyor.failure_policy import FailureAction, FailurePolicySpec
from conveyor.job_status import GroupFailure, GroupStatus
from conveyor.spec import RestartPolicySpec

from conveyor_operator import failure_rules, render
from conveyor_operator.backoff import budget_left, restart_delay
from conveyor_operator.observe import PodObservation, parse_time
from conveyor_operator.phase import GroupPods, backoff_due, detect_failure, format_time
from conveyor_operator.plan import Event, Plan
from conveyor_operator.progress import describe_resume
from conveyor_operator.restarts import account_group


def handle_failure(
    plan: Plan,
    group_status: GroupStatus,
    members: GroupPods,
    group: render.GroupRef,
    policy: RestartPolicySpec,
    now: datetime,
    failure_policy: FailurePolicySpec | None = None,
) -> tuple[bool, str | None]:
    """Account the group's container exits, detect a failure, and restart the group once its backoff is
    due. Returns (restarted by this plan, the failure if the backoffLimit is spent)."""
    # The watermarks move on every reconcile, failure pending or not: an exit is accounted once.
    container_failure, group_status.container_restarts = account_group(
        members.live, group_status.container_restarts
    )
    if group_status.failure is None:
        group_status.failure = detect_failure(
            members,
            group.pods,
            start_time=parse_time(group_status.start_time),
            running_since=parse_time(group_status.running_since),
            members_since=parse_time(group_status.members_since),
            policy=policy,
            now=now,
            container_failure=container_failure,
        )
        if group_status.failure is not None:
            # the leaving pods too: an evicted rank's DisruptionTarget explains its peers' exits
            decision = failure_rules.group_decision(failure_policy, [*members.live, *members.leaving])
            group_status.failure.action = decision.action
            group_status.failure.rule = f"{decision.rule} on pod {decision.pod}"
            if decision.cause:
                group_status.failure.message += f"; the worker says: {decision.cause}"
            _name_hang(group_status.failure, [*members.live, *members.leaving])
            ruled = failure_rules.describe(decision, plan.status.restarts, policy.backoff_limit)
            plan.events.append(
                Event(
                    "Warning",
                    group_status.failure.reason,
                    f"group {group.name}: {group_status.failure.message}; {ruled}",
                )
            )
    elif _name_hang(group_status.failure, [*members.live, *members.leaving]):
        # a peer's exit was seen first; the hung rank's own exit arrived while the restart is pending
        plan.events.append(Event("Warning", "Hung", f"group {group.name}: {group_status.failure.message}"))
    failure = group_status.failure
    if failure is not None and failure.action == FailureAction.IGNORE:
        group_status.failure = failure = None
    if failure is None:
        plan.delete(members.previous)
        return False, None
    if failure.action == FailureAction.FAIL_JOB:
        plan.fatal = f"group {group.name}: {failure.reason}: {failure.message} ({failure.rule})"
        return False, None
    counts = failure.action != FailureAction.RESTART_GROUP_NO_COUNT
    if counts and not budget_left(policy, plan.status.restarts):
        return False, f"group {group.name}: {failure.reason}: {failure.message}"
    delay = restart_delay(policy, group_status.restarts)
    if backoff_due(failure, delay, now):
        _restart_group(plan, group_status, members, policy.backoff_limit, now)
        return True, None
    due = parse_time(failure.time)
    wait = delay - (now - due).total_seconds() if due else delay
    plan.requeue_after = min(plan.requeue_after or wait, wait)
    return False, None


def _name_hang(failure: GroupFailure, pods: list[PodObservation]) -> bool:
    """Record reason Hung when a member's exit says its watchdog found it hung (failure_rules.hung_cause),
    whichever exit was seen first; True when this changed the reason."""
    if failure.reason == "Hung":
        return False
    found = failure_rules.hung_cause(pods)
    if found is None:
        return False
    pod, cause = found
    failure.reason = "Hung"
    if cause not in failure.message:
        failure.message += f"; pod {pod} hung: {cause}"
    return True


def _restart_group(
    plan: Plan, group_status: GroupStatus, members: GroupPods, limit: int, now: datetime
) -> None:
    """Replace every pod of the group at once with CONVEYOR_RESTART + 1: all ranks rendezvous again and
    resume from the latest committed checkpoint."""
    failure = group_status.failure
    assert failure is not None
    job_status = plan.status
    group_status.restarts += 1
    if failure.action != FailureAction.RESTART_GROUP_NO_COUNT:  # a disruption uses no budget
        job_status.restarts += 1
    group_status.failure = None
    group_status.start_time, group_status.running_since, group_status.members_since = (
        format_time(now),
        None,
        None,
    )
    group_status.resumed_from = group_status.last_checkpoint
    group_status.container_restarts = []  # the new generation's pods start counting from 0
    plan.delete(members.current + members.previous + members.outdated)
    plan.restarts.append(group_status.name)
    plan.events.append(
        Event(
            "Warning",
            "GroupRestarted",
            f"group {group_status.name} restart {group_status.restarts} (job restarts "
            f"{job_status.restarts}/{limit}) after {failure.reason}: {failure.message}; "
            f"resuming from {describe_resume(group_status.last_checkpoint)}",
        )
    )
