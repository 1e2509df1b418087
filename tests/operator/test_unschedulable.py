"""A group the scheduler cannot place is reported in the Unschedulable condition after the timeout,
naming its pods and the scheduler's message; nothing is restarted for it."""

from __future__ import annotations

from typing import Any

from conveyor_operator import k8s, unschedulable
from conveyor_operator.observe import observe_pod
from conveyor_operator.plan import JobView, Plan
from conveyor_operator.reconcile import plan_reconcile

from tests.operator.builders import at, group_pods, inference_spec, job_body, stamp

SAYS = "0/4 nodes are available: 4 node(s) didn't match pod affinity rules."


def unschedule(pod: dict[str, Any], since: float, message: str = SAYS) -> dict[str, Any]:
    """What the kube-scheduler leaves on a pod it cannot place."""
    pod["spec"].pop("nodeName", None)
    pod["status"] = {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
                "lastTransitionTime": stamp(since),
            }
        ],
    }
    return pod


def step(body: dict[str, Any], pods: list[dict[str, Any]], seconds: float) -> Plan:
    plan = plan_reconcile(JobView.from_body(body), [observe_pod(p) for p in pods], at(seconds))
    body["status"] = k8s.status_patch(plan.status)
    return plan


def conditions(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in body["status"]["conditions"]}


def test_observe_reads_the_schedulers_verdict() -> None:
    body = job_body(inference_spec())
    pod = observe_pod(unschedule(group_pods(body)[1], since=7))
    assert pod.unschedulable == SAYS and pod.unschedulable_since == at(7) and not pod.scheduled
    assert observe_pod(group_pods(body)[0]).unschedulable is None
    pending = group_pods(body)[0]
    pending["status"]["conditions"][0] = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "SchedulingGated",
    }
    assert observe_pod(pending).unschedulable is None  # gated (Kueue) is not refused


def test_find_reports_only_pods_past_the_timeout_and_when_the_next_one_will_be() -> None:
    body = job_body(inference_spec(stages=3))
    pods = group_pods(body)
    unschedule(pods[1], since=0)
    unschedule(pods[2], since=50, message="other")
    observed = [observe_pod(p) for p in pods]
    early = unschedulable.find([("llm-r0", observed)], 100, at(99))
    assert early.message is None and early.wait_seconds == 1
    found = unschedulable.find([("llm-r0", observed)], 100, at(120))
    assert found.message == f"group llm-r0: 1 of 3 pods unschedulable for over 100s (llm-r0-1): {SAYS}"
    assert found.wait_seconds == 30  # llm-r0-2 passes the timeout at 150s
    both = unschedulable.find([("llm-r0", observed)], 100, at(150))
    assert (
        both.message is not None and "2 of 3 pods" in both.message and "(llm-r0-1, llm-r0-2)" in both.message
    )
    assert both.wait_seconds is None


def test_reconcile_reports_unschedulable_once_then_clears_it_without_restarting() -> None:
    body = job_body(
        inference_spec(replicas=2, placement={"topologyKey": "rack", "unschedulableTimeoutSeconds": 60})
    )
    step(body, [], 0)
    pods = group_pods(body, 0) + group_pods(body, 1, ready=False)
    unschedule(pods[3], since=1)

    plan = step(body, pods, 30)
    assert "Unschedulable" not in conditions(body)
    assert plan.requeue_after is not None and plan.requeue_after <= 31

    plan = step(body, pods, 62)
    cond = conditions(body)["Unschedulable"]
    assert cond["status"] == "True" and cond["reason"] == "Unschedulable"
    assert "group llm-r1" in cond["message"] and "llm-r1-1" in cond["message"] and SAYS in cond["message"]
    assert [e.reason for e in plan.events].count("Unschedulable") == 1
    assert plan.delete_pods == [] and body["status"]["restarts"] == 0
    assert body["status"]["phase"] != "Failed"

    plan = step(body, pods, 90)
    assert "Unschedulable" not in [e.reason for e in plan.events]  # one Event per episode
    assert conditions(body)["Unschedulable"]["lastTransitionTime"] == stamp(62)

    placed = group_pods(body, 0) + group_pods(body, 1)
    step(body, placed, 120)
    cond = conditions(body)["Unschedulable"]
    assert (
        cond["status"] == "False"
        and cond["reason"] == "Scheduled"
        and cond["lastTransitionTime"] == stamp(120)
    )
    assert body["status"]["phase"] == "Running"


def test_a_job_never_unschedulable_has_no_such_condition() -> None:
    body = job_body(inference_spec())
    step(body, [], 0)
    step(body, group_pods(body, 0), 1000)
    assert "Unschedulable" not in conditions(body)
