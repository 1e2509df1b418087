"""Conditions beyond the phase's (pure): a serve fleet that is rolling or draining is Reconciling, even
while every replica serves, so Argo CD shows it Progressing and Flux waits for the rollout (kstatus:
Reconciling=True means the object has not reached its desired state yet)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from conveyor.job_status import Condition, FleetStatus

from conveyor_operator.phase import format_time


def fleet_reconciling(fleet: FleetStatus | None) -> tuple[str, str] | None:
    """(reason, message) while the fleet moves towards its spec, else None."""
    if fleet is None:
        return None
    if fleet.strategy is not None:
        return "RollingUpdate", fleet.message or ""
    if fleet.draining:
        return "ScaleDown", fleet.message or ""
    return None


def mark_reconciling(
    conditions: list[Condition],
    reason: str,
    message: str,
    *,
    previous: Sequence[Condition],
    now: datetime,
) -> list[Condition]:
    """Set Reconciling=True with ``reason``; its lastTransitionTime moves only if its status does."""
    before = next((c for c in previous if c.type == "Reconciling"), None)
    out = []
    for cond in conditions:
        if cond.type == "Reconciling":
            cond = cond.model_copy(update={"status": "True", "reason": reason, "message": message})
            kept = before is not None and before.status == "True" and before.last_transition_time
            cond.last_transition_time = before.last_transition_time if kept and before else format_time(now)
        out.append(cond)
    return out


def problem_condition(
    type_: str,
    found: tuple[str, str] | None,
    *,
    ok_reason: str,
    previous: Sequence[Condition],
    generation: int | None,
    now: datetime,
) -> Condition | None:
    """A condition of abnormal polarity (``Unschedulable``, ``CheckpointStale``): True with ``found``'s
    (reason, message) while the problem lasts; once it has been seen it stays, False, so its
    lastTransitionTime says when it ended; never there if it never happened."""
    before = next((c for c in previous if c.type == type_), None)
    if found is None and before is None:
        return None
    status: Literal["True", "False"] = "True" if found is not None else "False"
    reason, message = found if found is not None else (ok_reason, "")
    kept = before is not None and before.status == status and before.last_transition_time
    return Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        observed_generation=generation,
        last_transition_time=before.last_transition_time if kept and before else format_time(now),
    )


# The problem conditions a reconcile reports beside the phase's, and their reason once it is over.
PROBLEMS = {"Unschedulable": "Scheduled", "CheckpointStale": "CheckpointFresh"}


def problem_conditions(
    found: dict[str, tuple[str, str] | None],
    *,
    previous: Sequence[Condition],
    generation: int | None,
    now: datetime,
) -> tuple[list[Condition], list[Condition]]:
    """Every condition of PROBLEMS (``found``: type -> (reason, message) while it lasts), and those of
    them that just turned True (for an Event)."""
    out, started = [], []
    was_true = {c.type for c in previous if c.status == "True"}
    for type_, ok_reason in PROBLEMS.items():
        cond = problem_condition(
            type_, found.get(type_), ok_reason=ok_reason, previous=previous, generation=generation, now=now
        )
        if cond is None:
            continue
        out.append(cond)
        if cond.status == "True" and type_ not in was_true:
            started.append(cond)
    return out, started
