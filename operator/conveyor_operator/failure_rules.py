"""Which failure rule a failed pod matches, and what it costs the restart budget (pure).

A rule matches when every matcher it has matches (exit code in one of its codes or ranges, one of its
pod conditions True, one of its reasons inside the worker's cause). User rules come first, then the
defaults, then a plain RestartGroup. The decision carries the rule's label so that status and Events can
say which rule matched, for which pod, and how much budget is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from conveyor.failure import EXIT_REFUSED
from conveyor.failure_policy import FailureAction, FailurePolicySpec, FailureRule, parse_codes

from conveyor_operator.observe import PodObservation

DISRUPTION_CONDITION = "DisruptionTarget"  # set by the control plane on preemption, eviction, drain
HUNG_PREFIX = "Hung:"  # the cause a rank's watchdog leaves when its liveness probe fails (watchdog.py)

DEFAULT_RULES: tuple[FailureRule, ...] = (
    FailureRule(
        name="disruption",
        action=FailureAction.RESTART_GROUP_NO_COUNT,
        on_pod_conditions=[DISRUPTION_CONDITION],
    ),
    FailureRule(name="worker-refused", action=FailureAction.FAIL_JOB, on_exit_codes=[str(EXIT_REFUSED)]),
)


@dataclass(frozen=True)
class FailureFacts:
    """What is known of one failure of one pod."""

    pod: str
    exit_code: int | None = None  # None: no exit seen (evicted, deleted, or overwritten)
    conditions: frozenset[str] = frozenset()  # pod condition types that are True
    cause: str | None = None  # the worker's one-line termination message


@dataclass(frozen=True)
class Decision:
    action: FailureAction
    rule: str  # `rules[0]`, `rules[1] (name)`, `default disruption`, or `default`
    pod: str
    cause: str | None = None  # the worker's one-line cause, when it left one

    @property
    def counts(self) -> bool:
        return self.action == FailureAction.RESTART_GROUP

    @property
    def restarts(self) -> bool:
        return self.action in (FailureAction.RESTART_GROUP, FailureAction.RESTART_GROUP_NO_COUNT)


def rule_matches(rule: FailureRule, facts: FailureFacts) -> bool:
    """Every matcher the rule has must match; an exit-code matcher never matches a failure with no exit."""
    if rule.on_exit_codes:
        if facts.exit_code is None:
            return False
        ranges = [parse_codes(text) for text in rule.on_exit_codes]
        if not any(low <= facts.exit_code <= high for low, high in ranges):
            return False
    if rule.on_pod_conditions and not facts.conditions.intersection(rule.on_pod_conditions):
        return False
    return not rule.on_reasons or any(reason in (facts.cause or "") for reason in rule.on_reasons)


def decide(policy: FailurePolicySpec | None, facts: FailureFacts) -> Decision:
    """The first matching rule's action: user rules, then the defaults, then RestartGroup."""
    policy = policy or FailurePolicySpec()
    candidates: list[tuple[str, FailureRule]] = [
        (f"rules[{i}]" + (f" ({rule.name})" if rule.name else ""), rule)
        for i, rule in enumerate(policy.rules)
    ]
    if policy.default_rules:
        candidates += [(f"default {rule.name}", rule) for rule in DEFAULT_RULES]
    for label, rule in candidates:
        if rule_matches(rule, facts):
            return Decision(FailureAction(rule.action), label, facts.pod, facts.cause)
    return Decision(FailureAction.RESTART_GROUP, "default", facts.pod, facts.cause)


def first_decision(policy: FailurePolicySpec | None, failures: Sequence[FailureFacts]) -> Decision | None:
    """The decision for a group with several failed pods: FailJob beats an uncounted restart, which beats
    a counted one, which beats Ignore. A configuration error seen on one rank is the job's error; a
    disruption of one rank (an eviction, a preemption) makes its peers fail on the lost connection, and
    those exits are its consequence, not failures of their own to charge to the budget."""
    rank = {
        FailureAction.FAIL_JOB: 0,
        FailureAction.RESTART_GROUP_NO_COUNT: 1,
        FailureAction.RESTART_GROUP: 2,
        FailureAction.IGNORE: 3,
    }
    decisions = [decide(policy, facts) for facts in failures]
    return min(decisions, key=lambda d: rank[d.action], default=None)


def budget_after(decision: Decision, used: int, limit: int) -> tuple[int, int]:
    """(restarts used, restarts left) once ``decision`` is carried out; left below 0 means the job fails."""
    used_after = used + (1 if decision.counts else 0)
    return used_after, limit - used_after


def describe(decision: Decision, used: int, limit: int) -> str:
    used_after, left = budget_after(decision, used, limit)
    why = f"; the worker says: {decision.cause}" if decision.cause else ""
    return (
        f"failure rule {decision.rule} matched pod {decision.pod}: {decision.action} "
        f"(restarts used {used_after}/{limit}, {max(left, 0)} left){why}"
    )


def pod_facts(pod: PodObservation) -> FailureFacts | None:
    """A pod's failure as the rules see it: its newest failed exit (code and the worker's cause) and its
    True conditions; None for a pod that shows no failure and no disruption."""
    failed = [t for t in pod.terminations if t.failed]
    disrupted = DISRUPTION_CONDITION in pod.conditions
    if not failed and pod.failure is None and not disrupted:
        return None
    newest = failed[-1] if failed else None
    return FailureFacts(
        pod=pod.name,
        exit_code=newest.exit_code if newest is not None else None,
        conditions=pod.conditions,
        cause=newest.cause if newest is not None else None,
    )


def group_decision(
    policy: FailurePolicySpec | None, pods: Sequence[PodObservation], failed_pod: str | None = None
) -> Decision:
    """The decision for a group's failure from its pods' facts; with no pod showing one (a pod gone, a
    start-up timeout) a plain counted restart."""
    facts = [f for f in (pod_facts(p) for p in pods) if f is not None]
    return first_decision(policy, facts) or Decision(
        FailureAction.RESTART_GROUP, "default", failed_pod or "-"
    )


def hung_cause(pods: Sequence[PodObservation]) -> tuple[str, str] | None:
    """(pod, cause) of the first rank whose exit says its watchdog found it hung, else None.

    A hung rank is killed by its liveness probe, and its peers then fail on the lost connection (a gloo
    error). Which exit the operator sees first is a race: the peer's often wins, and the failure is first
    recorded with the peer's reason. The hung rank's cause is the real one, whenever it shows up while the
    failure is still pending, and whichever exit of that pod (not only its newest) carries it."""
    for pod in sorted(pods, key=lambda p: p.index):
        for term in pod.terminations:
            if term.failed and term.cause and term.cause.startswith(HUNG_PREFIX):
                return pod.name, term.cause
    return None
