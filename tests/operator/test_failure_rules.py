"""Failure rules: matching, order, defaults, and the budget they use (table tests, no cluster)."""

from __future__ import annotations

import pytest
from conveyor.failure_policy import FailureAction, FailurePolicySpec, FailureRule, parse_codes
from conveyor_operator.failure_rules import (
    Decision,
    FailureFacts,
    budget_after,
    decide,
    describe,
    first_decision,
    rule_matches,
)
from pydantic import ValidationError


def rule(**kw: object) -> FailureRule:
    return FailureRule.model_validate({"action": "RestartGroup", **kw})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("137", (137, 137)), ("128-255", (128, 255)), (" 1 - 3 ", (1, 3)), ("0", (0, 0))],
)
def test_codes_parse(text: str, expected: tuple[int, int]) -> None:
    assert parse_codes(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "3-1", "256", "1-300", "-1"])
def test_bad_codes_name_the_fix(text: str) -> None:
    with pytest.raises(ValueError, match="exit code"):
        parse_codes(text)
    with pytest.raises(ValidationError, match="exit code"):
        rule(onExitCodes=[text])


def test_rule_without_matcher_is_refused() -> None:
    with pytest.raises(ValidationError, match="onExitCodes, onPodConditions or onReasons"):
        rule()


@pytest.mark.parametrize(
    ("matchers", "facts", "matches"),
    [
        ({"onExitCodes": ["1", "128-255"]}, FailureFacts("p", exit_code=137), True),
        ({"onExitCodes": ["1", "128-255"]}, FailureFacts("p", exit_code=127), False),
        ({"onExitCodes": ["1"]}, FailureFacts("p", exit_code=None), False),
        (
            {"onPodConditions": ["DisruptionTarget"]},
            FailureFacts("p", conditions=frozenset({"DisruptionTarget"})),
            True,
        ),
        (
            {"onPodConditions": ["DisruptionTarget"]},
            FailureFacts("p", conditions=frozenset({"Ready"})),
            False,
        ),
        (
            {"onReasons": ["CUDA out of memory"]},
            FailureFacts("p", 1, cause="RuntimeError: CUDA out of memory."),
            True,
        ),
        ({"onReasons": ["CUDA out of memory"]}, FailureFacts("p", 1, cause=None), False),
        # every matcher must match
        ({"onExitCodes": ["1"], "onReasons": ["NCCL"]}, FailureFacts("p", 1, cause="NCCL timeout"), True),
        ({"onExitCodes": ["1"], "onReasons": ["NCCL"]}, FailureFacts("p", 2, cause="NCCL timeout"), False),
    ],
)
def test_rule_matching(matchers: dict[str, object], facts: FailureFacts, matches: bool) -> None:
    assert rule_matches(rule(**matchers), facts) is matches


def test_defaults_disruption_free_refusal_fatal_else_counted() -> None:
    disrupted = FailureFacts("job-g0-1", exit_code=143, conditions=frozenset({"DisruptionTarget"}))
    assert decide(None, disrupted) == Decision(
        FailureAction.RESTART_GROUP_NO_COUNT, "default disruption", "job-g0-1"
    )
    refused = FailureFacts("job-g0-0", exit_code=2, cause="model.path /nope: not found")
    assert decide(None, refused).action == FailureAction.FAIL_JOB
    assert decide(None, refused).rule == "default worker-refused"
    assert decide(None, FailureFacts("job-g0-0", exit_code=1)) == Decision(
        FailureAction.RESTART_GROUP, "default", "job-g0-0"
    )


def test_user_rules_come_first_in_order() -> None:
    policy = FailurePolicySpec.model_validate(
        {
            "rules": [
                {"name": "oom", "action": "Ignore", "onReasons": ["out of memory"]},
                {"action": "RestartGroupNoCount", "onExitCodes": ["2"]},
                {"action": "FailJob", "onExitCodes": ["1-3"]},
            ]
        }
    )
    assert decide(policy, FailureFacts("p", 2, cause="out of memory")).rule == "rules[0] (oom)"
    assert decide(policy, FailureFacts("p", 2)).action == FailureAction.RESTART_GROUP_NO_COUNT
    assert decide(policy, FailureFacts("p", 3)) == Decision(FailureAction.FAIL_JOB, "rules[2]", "p")


def test_defaults_can_be_turned_off() -> None:
    policy = FailurePolicySpec(default_rules=False)
    assert decide(policy, FailureFacts("p", 2)).action == FailureAction.RESTART_GROUP
    assert decide(policy, FailureFacts("p", conditions=frozenset({"DisruptionTarget"}))).counts


def test_group_decision_fail_beats_free_beats_counted() -> None:
    # an evicted rank and a peer that exited 1 on the lost connection: the eviction explains the exit
    failures = [
        FailureFacts("p-0", conditions=frozenset({"DisruptionTarget"})),
        FailureFacts("p-1", exit_code=1),
    ]
    assert first_decision(None, failures) == Decision(
        FailureAction.RESTART_GROUP_NO_COUNT, "default disruption", "p-0"
    )
    assert first_decision(None, failures[1:]) == Decision(FailureAction.RESTART_GROUP, "default", "p-1")
    assert (
        first_decision(None, [*failures, FailureFacts("p-2", exit_code=2)]).action == FailureAction.FAIL_JOB
    )
    assert first_decision(None, []) is None


@pytest.mark.parametrize(
    ("action", "used", "limit", "after"),
    [
        (FailureAction.RESTART_GROUP, 0, 3, (1, 2)),
        (FailureAction.RESTART_GROUP, 3, 3, (4, -1)),  # past the limit: the job fails
        (FailureAction.RESTART_GROUP_NO_COUNT, 3, 3, (3, 0)),  # a disruption never exhausts the budget
        (FailureAction.IGNORE, 1, 3, (1, 2)),
        (FailureAction.FAIL_JOB, 1, 3, (1, 2)),
    ],
)
def test_budget_arithmetic(action: FailureAction, used: int, limit: int, after: tuple[int, int]) -> None:
    assert budget_after(Decision(action, "r", "p"), used, limit) == after


def test_describe_says_rule_pod_and_budget() -> None:
    text = describe(Decision(FailureAction.RESTART_GROUP, "rules[1] (nccl)", "job-g1-0"), 1, 3)
    assert (
        text == "failure rule rules[1] (nccl) matched pod job-g1-0: RestartGroup (restarts used 2/3, 1 left)"
    )
