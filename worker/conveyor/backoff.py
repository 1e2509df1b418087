"""Restart delays: exponential backoff, capped, like a Job's pod backoff (pure). The operator and
`conveyor run` both use these, so a job restarts the same way in a cluster and on a laptop."""

from __future__ import annotations

from conveyor.spec import RestartPolicySpec


def restart_delay(policy: RestartPolicySpec, restarts_done: int) -> float:
    """Seconds to wait before restart number ``restarts_done + 1``: backoffSeconds * 2**restarts_done,
    at most maxBackoffSeconds."""
    if restarts_done < 0:
        raise ValueError(f"restarts_done must be >= 0, got {restarts_done}")
    # Cap the exponent first: 2**1000 is a fine int but a pointless one.
    exponent = min(restarts_done, 32)
    return float(min(policy.backoff_seconds * 2**exponent, policy.max_backoff_seconds))


def budget_left(policy: RestartPolicySpec, restarts_done: int) -> bool:
    """May the job restart a group once more? ``backoffLimit`` counts restarts of all groups together."""
    return restarts_done < policy.backoff_limit
