"""The reconcile planner against each situation: creation, readiness, every failure kind, backoff,
backoffLimit, completion, TTL, suspend/resume, layout changes, rolling updates, an invalid spec."""

from __future__ import annotations

from typing import Any

import pytest
from conveyor_operator import k8s
from conveyor_operator.observe import observe_pod
from conveyor_operator.plan import JobView, Plan
from conveyor_operator.reconcile import plan_reconcile

from tests.operator.builders import (
    at,
    complete,
    evict,
    fail,
    group_pods,
    inference_spec,
    job_body,
    serve_spec,
    stamp,
    train_spec,
)


def step(body: dict[str, Any], pods: list[dict[str, Any]], seconds: float) -> Plan:
    """One reconcile at T0 + seconds; the new status is stored on the body, as the API server would."""
    plan = plan_reconcile(JobView.from_body(body), [observe_pod(p) for p in pods], at(seconds))
    body["status"] = k8s.status_patch(plan.status)
    return plan


def reasons(plan: Plan) -> list[str]:
    return [e.reason for e in plan.events]


def sts_replicas(plan: Plan) -> dict[str, int]:
    return {o["metadata"]["name"]: o["spec"]["replicas"] for o in plan.apply if o["kind"] == "StatefulSet"}


def condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in body["status"]["conditions"] if c["type"] == type_)


def running_inference(replicas: int = 2, **extra: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    body = job_body(inference_spec(replicas=replicas, **extra))
    step(body, [], 0)
    pods = [p for r in range(replicas) for p in group_pods(body, r)]
    plan = step(body, pods, 5)
    assert body["status"]["phase"] == "Running", plan.status
    return body, pods


def test_create_applies_children_and_sets_status_at_once() -> None:
    body = job_body(inference_spec(replicas=2))
    plan = step(body, [], 0)
    kinds = [(o["kind"], o["metadata"]["name"]) for o in plan.apply]
    assert kinds == [("Service", "llm"), ("StatefulSet", "llm-r0"), ("StatefulSet", "llm-r1")]
    assert sts_replicas(plan) == {"llm-r0": 2, "llm-r1": 2}
    status = body["status"]
    assert status["phase"] == "Pending" and status["layout"] == "2x1x2" and status["ready"] == "0/2"
    assert status["observedGeneration"] == 1 and status["selector"] == "conveyor.dev/job=llm"
    assert status["resolved"]["gpusPerPod"] == 1 and status["resolved"]["microBatches"] == 2
    assert condition(body, "Ready")["status"] == "False"
    assert condition(body, "Reconciling")["status"] == "True"
    assert reasons(plan) == ["Pending"]


def test_ready_pods_make_the_job_running_and_get_stage_labels() -> None:
    body, pods = running_inference()
    assert body["status"]["ready"] == "2/2" and body["status"]["readyGroups"] == 2
    assert condition(body, "Ready") | {"lastTransitionTime": None} == {
        "type": "Ready",
        "status": "True",
        "reason": "Running",
        "message": "2 of 2 groups ready",
        "observedGeneration": 1,
        "lastTransitionTime": None,
    }
    plan = step(body, pods, 6)
    assert plan.events == []  # no transition, no Event
    assert plan.label_pods["llm-r1-1"] == {"conveyor.dev/replica": "1", "conveyor.dev/stage": "1"}


def test_starting_while_not_all_ready() -> None:
    body = job_body(inference_spec(replicas=1))
    step(body, [], 0)
    pods = group_pods(body, 0, ready=False)
    step(body, pods, 5)
    assert body["status"]["phase"] == "Starting"


@pytest.mark.parametrize(
    ("breaks", "reason"),
    [
        (lambda pods: fail(pods[1]), "ContainerRestarted"),
        (lambda pods: fail(pods[1], restarted=False), "PodFailed"),
        (lambda pods: evict(pods[0]), "PodEvicted"),
        (lambda pods: pods.pop(1), "PodDeleted"),
    ],
)
def test_a_failure_restarts_only_that_replicas_group_after_the_backoff(breaks: Any, reason: str) -> None:
    body, pods = running_inference(replicas=2)
    broken = [p for p in pods]
    group0 = broken[:2]
    breaks(group0)
    broken = group0 + broken[2:]
    plan = step(body, broken, 20)
    assert reason in reasons(plan) and body["status"]["phase"] == "Restarting"
    assert plan.delete_pods == []  # backoffSeconds = 10: not yet
    assert body["status"]["groups"][0]["failure"]["reason"] == reason
    assert plan.requeue_after == pytest.approx(10)

    plan = step(body, broken, 30)
    assert sorted(plan.delete_pods) == sorted(p["metadata"]["name"] for p in group0)  # the whole group
    assert body["status"]["restarts"] == 1 and body["status"]["groups"][0]["restarts"] == 1
    assert body["status"]["groups"][1]["restarts"] == 0  # the other replica keeps running
    assert "GroupRestarted" in reasons(plan)
    sts = {o["metadata"]["name"]: o for o in plan.apply if o["kind"] == "StatefulSet"}
    env = {
        e["name"]: e.get("value") for e in sts["llm-r0"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["CONVEYOR_RESTART"] == "1"
    env1 = {
        e["name"]: e.get("value") for e in sts["llm-r1"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env1["CONVEYOR_RESTART"] == "0"

    # The StatefulSet recreates the group with restart 1; it stays Restarting until it runs again.
    loading = group_pods(body, 0, restart=1, created=40, ready=False) + pods[2:]
    step(body, loading, 41)
    assert body["status"]["phase"] == "Restarting" and body["status"]["groups"][0]["phase"] == "Restarting"
    fresh = group_pods(body, 0, restart=1, created=40) + pods[2:]
    step(body, fresh, 45)
    assert body["status"]["phase"] == "Running"
    assert condition(body, "Ready")["status"] == "True"


def test_pods_of_an_earlier_restart_are_replaced_without_counting_a_failure() -> None:
    body, pods = running_inference(replicas=1)
    fail(pods[0])
    step(body, pods, 20)
    step(body, pods, 30)  # restart 1 planned; suppose the pod deletions were lost (operator crash)
    plan = step(body, pods, 31)
    assert sorted(plan.delete_pods) == ["llm-r0-0", "llm-r0-1"]
    assert body["status"]["restarts"] == 1 and "GroupRestarted" not in reasons(plan)


def test_backoff_doubles_per_restart_of_the_group() -> None:
    body, pods = running_inference(replicas=1)
    fail(pods[0])
    step(body, pods, 100)
    step(body, pods, 110)  # restart 1 after 10 s
    fresh = group_pods(body, 0, restart=1, created=111)
    step(body, fresh, 115)
    fail(fresh[1])
    step(body, fresh, 200)  # second failure: 20 s backoff
    assert step(body, fresh, 215).delete_pods == []
    assert sorted(step(body, fresh, 220).delete_pods) == ["llm-r0-0", "llm-r0-1"]
    assert body["status"]["groups"][0]["restarts"] == 2


def test_backoff_limit_fails_the_job_and_stops_pods() -> None:
    body = job_body(inference_spec(replicas=1, restartPolicy={"backoffLimit": 1, "backoffSeconds": 0}))
    step(body, [], 0)
    pods = group_pods(body, 0)
    step(body, pods, 1)
    step(body, [fail(pods[0]), pods[1]], 2)  # restart 1 (immediate: backoffSeconds 0)
    assert body["status"]["restarts"] == 1
    fresh = group_pods(body, 0, restart=1, created=3)
    step(body, fresh, 4)
    plan = step(body, [evict(fresh[0]), fresh[1]], 5)
    status = body["status"]
    assert status["phase"] == "Failed" and status["reason"] == "BackoffLimitExceeded"
    assert "PodEvicted" in status["message"] and status["completionTime"]
    assert condition(body, "Stalled")["status"] == "True" and condition(body, "Ready")["status"] == "False"
    assert sts_replicas(plan) == {"llm-r0": 0} and plan.delete_pods == []
    assert any(e.type == "Warning" and e.reason == "Failed" for e in plan.events)
    # Terminal: later reconciles keep it Failed.
    step(body, [], 100)
    assert body["status"]["phase"] == "Failed"


def test_startup_timeout_restarts_the_group() -> None:
    spec = inference_spec(replicas=1, restartPolicy={"backoffSeconds": 0, "startupTimeoutSeconds": 60})
    body = job_body(spec)
    step(body, [], 0)
    pods = group_pods(body, 0, ready=False)
    assert step(body, pods, 59).delete_pods == []
    plan = step(body, pods, 61)
    assert "StartupTimeout" in reasons(plan) and len(plan.delete_pods) == 2


def test_completion_succeeds_stops_pods_and_cleans_after_ttl() -> None:
    body, pods = running_inference(replicas=2, ttlSecondsAfterFinished=300)
    done = [complete(p, step=40) for p in pods[:2]] + pods[2:]
    step(body, done, 50)
    assert body["status"]["phase"] == "Running"  # replica 1 still works
    assert body["status"]["lastCheckpoint"]["step"] == 40
    plan = step(body, [complete(p, step=40) for p in pods], 60)
    status = body["status"]
    assert status["phase"] == "Succeeded" and status["reason"] == "Completed" and status["completionTime"]
    assert sts_replicas(plan) == {"llm-r0": 0, "llm-r1": 0}
    assert condition(body, "Ready")["status"] == "True"
    assert not step(body, [], 300).delete_children
    plan = step(body, [], 361)
    assert plan.delete_children and plan.apply == [] and "Cleaned" in reasons(plan)
    assert body["status"]["phase"] == "Succeeded"


def test_serve_never_completes() -> None:
    body = job_body(serve_spec(replicas=1))
    step(body, [], 0)
    pods = [complete(p) for p in group_pods(body, 0)]
    step(body, pods, 5)
    assert body["status"]["phase"] != "Succeeded"


def test_train_failure_restarts_the_whole_job() -> None:
    body = job_body(train_spec(stages=2, replicas=2))
    plan = step(body, [], 0)
    assert sts_replicas(plan) == {"llm": 4}
    pods = group_pods(body, 0)
    assert len(pods) == 4
    step(body, pods, 5)
    assert body["status"]["phase"] == "Running"
    plan = step(body, [fail(pods[3])] + pods[:3], 10)
    assert sorted(plan.delete_pods) == ["llm-0", "llm-1", "llm-2", "llm-3"]
    assert body["status"]["groups"][0]["restarts"] == 1
    assert plan.label_pods["llm-3"] == {"conveyor.dev/replica": "1", "conveyor.dev/stage": "1"}


def test_restart_records_the_checkpoint_it_resumes_from() -> None:
    body = job_body(train_spec())
    step(body, [], 0)
    pods = group_pods(body, 0)
    step(body, pods, 1)
    msg = '{"lastCheckpoint": {"step": 30, "time": "2026-11-23T12:00:00Z"}}'
    plan = step(body, [fail(pods[0], message=msg)] + pods[1:], 2)
    assert body["status"]["lastCheckpoint"]["step"] == 30
    assert body["status"]["groups"][0]["resumedFrom"]["step"] == 30
    assert any("resuming from checkpoint step 30" in e.message for e in plan.events)


def test_suspend_stops_pods_keeps_restarts_and_resume_starts_again() -> None:
    body, pods = running_inference(replicas=1)
    fail(pods[0])
    step(body, pods, 20)
    step(body, pods, 30)
    body["spec"]["suspend"] = True
    plan = step(body, [], 40)
    assert body["status"]["phase"] == "Suspended" and sts_replicas(plan) == {"llm-r0": 0}
    assert body["status"]["groups"][0]["restarts"] == 1
    body["spec"]["suspend"] = False
    plan = step(body, [], 50)
    assert sts_replicas(plan) == {"llm-r0": 2} and body["status"]["phase"] == "Pending"
    assert body["status"]["groups"][0]["startTime"] == "2026-11-23T12:00:50Z"
    env = {
        e["name"]: e.get("value") for e in plan.apply[-1]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["CONVEYOR_RESTART"] == "1"  # the workers resume from the checkpoint


def test_layout_change_is_refused_while_running() -> None:
    body, pods = running_inference(replicas=1)
    body["spec"]["parallelism"]["stages"] = 4
    plan = step(body, pods, 10)
    assert plan.apply == [] and plan.delete_pods == []
    assert body["status"]["reason"] == "LayoutChangeRefused" and body["status"]["layout"] == "2x1x1"
    assert "suspend: true" in body["status"]["message"] and "LayoutChangeRefused" in reasons(plan)
    assert condition(body, "Stalled")["status"] == "True" and condition(body, "Ready")["status"] == "False"
    body["spec"]["parallelism"]["stages"] = 2  # reverted: healthy again
    step(body, pods, 20)
    assert condition(body, "Stalled")["status"] == "False" and body["status"]["phase"] == "Running"


def test_layout_change_while_suspended_is_allowed() -> None:
    body, pods = running_inference(replicas=1)
    body["spec"]["suspend"] = True
    step(body, [], 10)
    body["spec"]["parallelism"]["stages"] = 4
    body["spec"]["suspend"] = False
    plan = step(body, [], 20)
    assert sts_replicas(plan) == {"llm-r0": 4} and body["status"]["layout"] == "4x1x1"


def test_spec_change_rolls_one_group_at_a_time() -> None:
    body = job_body(inference_spec(replicas=2))
    step(body, [], 0)
    old = group_pods(body, 0) + group_pods(body, 1)
    step(body, old, 5)
    assert body["status"]["phase"] == "Running"
    new_spec = inference_spec(replicas=2, image="registry.local/conveyor:2")
    body["spec"] = new_spec
    plan = step(body, old, 10)
    assert sorted(plan.delete_pods) == ["llm-r0-0", "llm-r0-1"] and "GroupRolled" in reasons(plan)
    # r0 comes back with the new template; r1 waits until r0 is ready (serve jobs: see test_fleet.py).
    new_r0 = group_pods(body, 0, ready=False, created=11, spec_override=new_spec)
    assert step(body, new_r0 + old[2:], 12).delete_pods == []
    new_r0 = group_pods(body, 0, created=11, spec_override=new_spec)
    plan = step(body, new_r0 + old[2:], 20)
    assert sorted(plan.delete_pods) == ["llm-r1-0", "llm-r1-1"]
    assert body["status"]["restarts"] == 0


def test_serve_scaling_does_not_roll_existing_groups() -> None:
    body = job_body(serve_spec(replicas=1))
    step(body, [], 0)
    pods = group_pods(body, 0)
    step(body, pods, 5)
    body["spec"]["parallelism"]["replicas"] = 2
    plan = step(body, pods, 10)
    assert plan.delete_pods == [] and sts_replicas(plan) == {"llm-r0": 2, "llm-r1": 2}
    assert body["status"]["ready"] == "1/2" and body["status"]["replicas"] == 2


def test_invalid_spec_is_reported_not_applied_and_recovers() -> None:
    body = job_body(inference_spec(parallelism={"stages": 0}))
    plan = step(body, [], 0)
    status = body["status"]
    assert plan.apply == [] and status["phase"] == "Failed" and status["reason"] == "InvalidSpec"
    assert "spec.parallelism.stages" in status["message"]
    body["spec"]["parallelism"]["stages"] = 2
    step(body, [], 10)
    assert body["status"]["phase"] == "Pending"


def test_conditions_keep_their_transition_time_while_unchanged() -> None:
    body, pods = running_inference(replicas=1)
    first = condition(body, "Ready")["lastTransitionTime"]
    step(body, pods, 50)
    assert condition(body, "Ready")["lastTransitionTime"] == first


def test_scaling_down_deletes_the_groups_scaled_away() -> None:
    body = job_body(serve_spec(replicas=3))
    step(body, [], 0)
    body["spec"]["parallelism"]["replicas"] = 1
    plan = step(body, [], 10)  # serve: drained first (test_fleet.py), deleted after drainSeconds
    assert plan.delete_statefulsets == [] and sts_replicas(plan) == {"llm-r0": 2}
    plan = step(body, [], 20)
    assert plan.delete_statefulsets == ["llm-r2", "llm-r1"] and sts_replicas(plan) == {"llm-r0": 2}
    assert step(body, [], 30).delete_statefulsets == []


def test_a_finished_group_is_not_restarted_while_the_others_work() -> None:
    body, pods = running_inference(replicas=2)
    done = [complete(p) for p in pods[:2]]
    step(body, done + pods[2:], 10)
    assert body["status"]["groups"][0]["phase"] == "Succeeded"
    plan = step(body, [evict(done[0]), done[1]] + pods[2:], 20)
    assert plan.delete_pods == [] and body["status"]["restarts"] == 0
    assert body["status"]["groups"][0]["phase"] == "Succeeded" and body["status"]["phase"] == "Running"


def terminating(pod: dict[str, Any], asked_at: float, grace: int = 30) -> dict[str, Any]:
    """The pod after a graceful delete asked at ``asked_at``: the kubelet should be done by the deadline."""
    pod["metadata"].update(deletionTimestamp=stamp(asked_at + grace), deletionGracePeriodSeconds=grace)
    return pod


def test_a_restart_deletes_pods_gracefully_and_asks_once() -> None:
    body, pods = running_inference(replicas=1)
    fail(pods[0])
    step(body, pods, 20)
    plan = step(body, pods, 30)
    assert "GroupRestarted" in reasons(plan)
    assert sorted(plan.delete_pods) == ["llm-r0-0", "llm-r0-1"] and plan.force_delete_pods == []
    for pod in pods:
        terminating(pod, asked_at=30)
    plan = step(body, pods, 35)  # still stopping within their grace period: nothing more to ask
    assert plan.delete_pods == [] and plan.force_delete_pods == []
    assert plan.requeue_after == pytest.approx(30 + 30 + 30 - 35)  # back when they would be stuck


def test_a_pod_stuck_terminating_past_its_grace_is_force_deleted() -> None:
    body, pods = running_inference(replicas=1)
    terminating(pods[1], asked_at=10)  # e.g. the node went away and its pods were evicted
    plan = step(body, pods, 10 + 30 + 29)
    assert plan.force_delete_pods == []
    plan = step(body, pods, 10 + 30 + 31)
    assert plan.force_delete_pods == ["llm-r0-1"] and "PodForceDeleted" in reasons(plan)
    assert plan.pod_uids.get("llm-r0-1") == pods[1]["metadata"].get("uid")
