"""spec.failurePolicy through the reconcile planner: a disruption restarts without budget, the worker's
refusal fails the job at once with its cause, Ignore leaves the group alone, and Events name the rule."""

from __future__ import annotations

import copy
import json
from typing import Any

from conveyor_operator.plan import Plan

from tests.operator.builders import fail, group_pods, inference_spec, job_body
from tests.operator.test_reconcile import condition, reasons, step


def running(**extra: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    extra.setdefault("restartPolicy", {"backoffLimit": 1, "backoffSeconds": 0})
    body = job_body(inference_spec(replicas=1, **extra))
    step(body, [], 0)
    pods = group_pods(body, 0)
    step(body, pods, 5)
    assert body["status"]["phase"] == "Running"
    return body, pods


def disrupt(pod: dict[str, Any]) -> dict[str, Any]:
    """A preemption: the control plane marks the pod DisruptionTarget and its worker is killed (143)."""
    fail(pod, 143, restarted=False)
    pod["status"]["conditions"].append(
        {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
    )
    return pod


def test_a_disruption_restarts_the_group_without_using_the_budget() -> None:
    body, pods = running()
    for generation in range(3):  # three preemptions with backoffLimit 1: never Failed
        broken = group_pods(body, 0, restart=generation, created=10 * generation)
        disrupt(broken[1])
        plan = step(body, broken, 10 * generation + 6)
        assert "GroupRestarted" in reasons(plan), body["status"]
        assert body["status"]["restarts"] == 0
        assert body["status"]["groups"][0]["restarts"] == generation + 1
        ruled = next(e.message for e in plan.events if e.reason == "PodFailed")
        assert "failure rule default disruption matched pod llm-r0-1: RestartGroupNoCount" in ruled
        assert "restarts used 0/1, 1 left" in ruled
    assert body["status"]["phase"] == "Restarting"


def test_the_workers_refusal_fails_the_job_at_once_with_its_cause() -> None:
    body, pods = running()
    cause = "model.path /models/nope: no config.json there; set spec.model.path to a model directory"
    message = json.dumps({"completed": False, "cause": cause})
    plan = step(body, [fail(pods[0], 2, message=message), pods[1]], 6)
    status = body["status"]
    assert status["phase"] == "Failed" and status["reason"] == "FailedByRule", status
    assert cause in status["message"] and "default worker-refused on pod llm-r0-0" in status["message"]
    assert status["restarts"] == 0 and "GroupRestarted" not in reasons(plan)
    assert condition(body, "Ready")["status"] == "False"


def test_user_rules_decide_before_the_defaults() -> None:
    rules = [
        {"name": "flaky-nic", "action": "RestartGroupNoCount", "onReasons": ["NCCL"]},
        {"action": "FailJob", "onExitCodes": ["3-9"]},
    ]
    body, pods = running(failurePolicy={"rules": rules})
    nccl = json.dumps({"cause": "DistBackendError: NCCL error: unhandled system error"})
    plan = step(body, [fail(pods[0], 1, message=nccl), pods[1]], 6)
    assert "GroupRestarted" in reasons(plan) and body["status"]["restarts"] == 0
    assert body["status"]["groups"][0].get("failure") is None

    fresh = group_pods(body, 0, restart=1, created=7)
    step(body, [fail(fresh[0], 5), fresh[1]], 8)
    assert body["status"]["phase"] == "Failed" and "rules[1] on pod llm-r0-0" in body["status"]["message"]


def test_ignore_leaves_the_group_running_and_counts_nothing() -> None:
    body, pods = running(failurePolicy={"rules": [{"action": "Ignore", "onExitCodes": ["42"]}]})
    plan = step(body, [fail(pods[0], 42), pods[1]], 6)
    assert "GroupRestarted" not in reasons(plan) and plan.delete_pods == []
    assert body["status"]["restarts"] == 0 and body["status"]["groups"][0]["restarts"] == 0
    # The kubelet restarted it in place; once it is ready again the group runs on, failure not re-counted.
    step(body, group_pods(body, 0), 7)
    assert body["status"]["phase"] == "Running"


def test_a_plain_crash_still_counts_and_exhausts_the_budget() -> None:
    body, pods = running()
    plan = step(body, [fail(pods[0], 1), pods[1]], 6)
    assert body["status"]["restarts"] == 1
    ruled = next(e.message for e in plan.events if e.reason == "ContainerRestarted")
    assert "failure rule default matched pod llm-r0-0: RestartGroup (restarts used 1/1, 0 left)" in ruled
    fresh = group_pods(body, 0, restart=1, created=7)
    step(body, [fail(fresh[0], 1), fresh[1]], 8)
    assert body["status"]["reason"] == "BackoffLimitExceeded"


def test_a_hung_rank_killed_by_its_liveness_probe_restarts_the_group_as_hung() -> None:
    body, pods = running(failurePolicy={"hangTimeoutSeconds": 60})
    hung = json.dumps({"completed": False, "cause": "Hung: no progress for 65s (hangTimeoutSeconds 60)"})
    plan = step(body, [pods[0], fail(pods[1], 143, message=hung)], 6)
    assert "Hung" in reasons(plan) and "GroupRestarted" in reasons(plan)
    assert body["status"]["restarts"] == 1


HUNG = json.dumps({"completed": False, "cause": "Hung: no progress for 65s (hangTimeoutSeconds 60)"})
GLOO = json.dumps({"completed": False, "cause": "RuntimeError: [gloo] Connection closed by peer"})


def _pending_hang(first: int) -> tuple[dict[str, Any], list[Plan]]:
    """Rank ``first``'s exit is seen one reconcile before the other's; a 10 s backoff keeps the failure
    pending in between. Rank 1 hung (its liveness probe killed it), rank 0 failed on the lost peer."""
    body, pods = running(
        failurePolicy={"hangTimeoutSeconds": 60},
        restartPolicy={"backoffLimit": 3, "backoffSeconds": 10, "maxBackoffSeconds": 10},
    )
    exits = {0: (1, GLOO), 1: (143, HUNG)}
    seen = [copy.deepcopy(pods[0]), copy.deepcopy(pods[1])]
    code, message = exits[first]
    fail(seen[first], code, message=message)
    plans = [step(body, seen, 6)]
    code, message = exits[1 - first]
    fail(seen[1 - first], code, message=message)
    plans.append(step(body, seen, 8))
    plans.append(step(body, seen, 17))  # the backoff is over: the restart
    return body, plans


def test_hung_is_named_when_the_peers_exit_arrives_first() -> None:
    body, plans = _pending_hang(first=0)
    assert body["status"]["restarts"] == 1
    assert "Hung" not in reasons(plans[0])  # so far only the gloo error is known
    assert "Hung" in reasons(plans[1]), plans[1].events  # the hung rank's exit renames it at once
    assert plans[1].status.reason == "Hung"
    restarted = next(e.message for e in plans[2].events if e.reason == "GroupRestarted")
    assert "after Hung:" in restarted and "pod llm-r0-1 hung: Hung: no progress" in restarted, restarted


def test_hung_is_named_when_the_hung_ranks_exit_arrives_first() -> None:
    body, plans = _pending_hang(first=1)
    assert "Hung" in reasons(plans[0]) and plans[0].status.reason == "Hung"
    assert "Hung" not in reasons(plans[1])  # the peer's later exit changes nothing, nor says it twice
    assert plans[1].status.reason == "Hung"
    restarted = next(e.message for e in plans[2].events if e.reason == "GroupRestarted")
    assert "after Hung:" in restarted, restarted
    assert body["status"]["restarts"] == 1


def test_hung_cause_reads_every_failed_exit_of_every_member() -> None:
    from conveyor_operator.failure_rules import hung_cause
    from conveyor_operator.observe import observe_pod

    body, pods = running()
    assert hung_cause([observe_pod(p) for p in pods]) is None
    gloo = fail(copy.deepcopy(pods[0]), 1, message=GLOO)
    assert hung_cause([observe_pod(gloo)]) is None
    hung = fail(copy.deepcopy(pods[1]), 143, message=HUNG)
    # the hung exit is in lastState and a later exit is in state: still found
    hung["status"]["containerStatuses"][0]["state"] = {"terminated": {"exitCode": 1, "message": GLOO}}
    assert hung_cause([observe_pod(gloo), observe_pod(hung)]) == (
        "llm-r0-1",
        "Hung: no progress for 65s (hangTimeoutSeconds 60)",
    )


def test_the_hang_timeout_renders_a_liveness_probe_on_live() -> None:
    from conveyor.spec import parse_spec
    from conveyor_operator import render

    def container(spec: dict[str, Any]) -> dict[str, Any]:
        parsed = parse_spec(spec)
        group = render.groups("llm", parsed)[0]
        sts = render.build_statefulset(
            render.JobRef("llm", "ml", "uid"), parsed, group, restart=0, running=True
        )
        return sts["spec"]["template"]["spec"]["containers"][0]

    plain = container(inference_spec())
    assert "livenessProbe" not in plain
    assert "CONVEYOR_HANG_TIMEOUT" not in {e["name"] for e in plain["env"]}
    watched = container(inference_spec(failurePolicy={"hangTimeoutSeconds": 120}))
    assert watched["livenessProbe"]["httpGet"] == {"path": "/live", "port": "metrics"}
    assert {"name": "CONVEYOR_HANG_TIMEOUT", "value": "120"} in watched["env"]
    assert "startupProbe" in watched  # loading is start-up, not a hang
