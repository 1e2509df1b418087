"""Conditions beyond the phase's (pure): a serve fleet that is rolling or draining is Reconciling, even
while every replica serves, so Argo CD shows it Progressing and Flux waits for the rollout (kstatus:
Reconciling=True means the object has not reached its desired state yet)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from conveyor.spec import Condition, FleetStatus

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
