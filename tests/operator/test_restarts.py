"""In-place container restarts: each exit accounted once through the per-pod watermark (restarts.py), the
exit numbering read from the pod (observe.py), watch-event evidence merged into the listing, and the
planner restarting the group once per crash, however often it reconciles."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from conveyor.job_status import ContainerRestarts
from conveyor_operator.handlers import with_witnesses
from conveyor_operator.observe import observe_pod
from conveyor_operator.plan import JobView
from conveyor_operator.reconcile import plan_reconcile
from conveyor_operator.restarts import account_group, account_pod

from tests.operator.builders import at, group_pods, inference_spec, job_body, stamp
from tests.operator.test_reconcile import reasons, running_inference, step

DONE = json.dumps({"completed": True, "lastCheckpoint": {"step": 7}})


def pod(uid: str = "u1", **worker: Any) -> dict[str, Any]:
    """Stage 0 of a running 2-stage group, with the worker's containerStatus fields replaced."""
    raw = group_pods(job_body(inference_spec()), 0)[0]
    raw["metadata"]["uid"] = uid
    raw["status"]["containerStatuses"][0].update(worker)
    return raw


def exited(code: int, message: str = "", finished: float = 10) -> dict[str, Any]:
    term = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "finishedAt": stamp(finished)}
    if message:
        term["message"] = message
    return {"terminated": term}


def mark(terminations: int, uid: str = "u1", completed: bool = False) -> ContainerRestarts:
    return ContainerRestarts(pod="llm-r0-0", uid=uid, terminations=terminations, completed=completed)


def test_exits_are_numbered_from_restart_count() -> None:
    running = observe_pod(pod(restartCount=3, lastState=exited(137), state={"running": {}}))
    assert running.exits == 3 and [t.index for t in running.terminations] == [3]
    down = observe_pod(pod(restartCount=3, lastState=exited(137), state=exited(1, finished=20)))
    assert down.exits == 4 and [(t.index, t.exit_code) for t in down.terminations] == [(3, 137), (4, 1)]
    assert observe_pod(pod()).exits == 0 and observe_pod(pod()).terminations == ()


def test_a_fresh_pod_has_nothing_to_account() -> None:
    assert account_pod(observe_pod(pod()), None) == (None, None)


def test_a_crash_restarted_in_place_is_a_failure_once() -> None:
    crashed = observe_pod(pod(restartCount=1, lastState=exited(137), state={"running": {}}))
    failure, moved = account_pod(crashed, None)
    assert failure is not None and failure.reason == "ContainerRestarted"
    assert "llm-r0-0" in failure.message and "exited 137" in failure.message
    assert moved == mark(1)
    # The same pod again, any number of times: nothing new past the watermark.
    for _ in range(3):
        again, moved = account_pod(crashed, moved)
        assert again is None and moved == mark(1)


def test_a_crash_whose_exit_code_was_overwritten_still_counts() -> None:
    # Two exits since the operator last looked; lastState shows only the second (exit 0, no completion).
    raw = pod(restartCount=2, lastState=exited(0, "bye"), state={"running": {}})
    failure, moved = account_pod(observe_pod(raw), None)
    assert failure is not None and "exit 1 was overwritten" in failure.message and moved == mark(2)
    # Seen up to exit 1 before (a clean exit 0 that did not complete): exit 2 is visible and not a failure.
    assert account_pod(observe_pod(raw), mark(1))[0] is None


def test_exits_after_a_completion_are_re_exits() -> None:
    # The worker completed (exit 1) and exited 0 again twice, all before the operator looked.
    raw = pod(restartCount=3, lastState=exited(0, DONE), state={"running": {}})
    failure, moved = account_pod(observe_pod(raw), None)
    assert failure is None and moved == mark(3, completed=True)
    # Known complete: later exits, whatever they show, are a finished worker's.
    later = pod(restartCount=6, lastState=exited(0, DONE), state={"running": {}})
    assert account_pod(observe_pod(later), moved) == (None, mark(6, completed=True))


def test_a_visible_crash_counts_even_if_the_worker_finished_after_it() -> None:
    raw = pod(restartCount=1, lastState=exited(137), state=exited(0, DONE, finished=30))
    failure, moved = account_pod(observe_pod(raw), None)
    assert failure is not None and "exited 137" in failure.message and moved == mark(2, completed=True)


def test_a_pod_recreated_under_the_same_name_counts_from_zero() -> None:
    old = mark(5, uid="u1")
    assert account_pod(observe_pod(pod(uid="u2")), old) == (None, None)
    crashed = observe_pod(pod(uid="u2", restartCount=1, lastState=exited(1), state={"running": {}}))
    failure, moved = account_pod(crashed, old)
    assert failure is not None and moved == mark(1, uid="u2")


def test_a_stale_listing_behind_the_watermark_counts_nothing() -> None:
    stale = observe_pod(pod(restartCount=1, lastState=exited(137), state={"running": {}}))
    assert account_pod(stale, mark(2)) == (None, mark(2))


def test_an_exit_caused_by_the_pods_deletion_is_not_a_failure() -> None:
    raw = pod(restartCount=0, state=exited(143, finished=65))
    raw["metadata"].update(deletionTimestamp=stamp(90), deletionGracePeriodSeconds=30)  # asked at 60
    raw["status"]["phase"] = "Failed"
    seen = observe_pod(raw)
    assert seen.failure is None and seen.phase_failure is None
    assert account_pod(seen, None)[0] is None
    # The same exit before the deletion was asked for is a real failure.
    raw["status"]["containerStatuses"][0]["state"] = exited(143, finished=50)
    seen = observe_pod(raw)
    assert seen.failure is not None and account_pod(seen, None)[0] is not None


def test_a_group_crash_counts_once_for_all_its_pods() -> None:
    # One rank died; the other pod's ranks failed in the collective: one incident, one failure.
    raws = group_pods(job_body(inference_spec()), 0)
    for i, raw in enumerate(raws):
        raw["metadata"]["uid"] = f"u{i}"
        raw["status"]["containerStatuses"][0].update(
            restartCount=1, lastState=exited(137 if i == 0 else 1), state={"running": {}}
        )
    pods = [observe_pod(p) for p in raws]
    failure, marks = account_group(pods, [])
    assert failure is not None and "llm-r0-0" in failure.message
    assert [(m.pod, m.terminations) for m in marks] == [("llm-r0-0", 1), ("llm-r0-1", 1)]
    assert account_group(pods, marks) == (None, marks)
    # A pod that is gone takes its mark with it.
    assert account_group(pods[1:], marks) == (None, marks[1:])
    # Its replacement under the same name (new uid) counts from 0; a watch event's view of the old one,
    # still carrying its exit, does not move the new pod's watermark.
    replacement = observe_pod(dict(raws[0], metadata={**raws[0]["metadata"], "uid": "u9"}))
    replacement = dataclasses.replace(replacement, exits=0, terminations=())
    failure, moved = account_group([pods[0], replacement, pods[1]], marks)
    assert failure is None and [(m.pod, m.uid, m.terminations) for m in moved] == [
        ("llm-r0-0", "u0", 1),
        ("llm-r0-1", "u1", 1),
    ]


def test_watch_evidence_overwritten_in_the_listing_is_kept() -> None:
    event = observe_pod(pod(restartCount=1, lastState=exited(137), state={"running": {}}))
    listing = observe_pod(pod(restartCount=2, lastState=exited(0, "bye"), state={"running": {}}))
    (merged,) = with_witnesses([listing], [event])
    assert [(t.index, t.exit_code) for t in merged.terminations] == [(1, 137), (2, 0)]
    failure, _ = account_pod(merged, None)
    assert failure is not None and "exited 137" in failure.message
    # A witness of another incarnation adds nothing to the listed pod.
    other = observe_pod(pod(uid="u0", restartCount=1, lastState=exited(137), state={"running": {}}))
    assert with_witnesses([listing], [other])[0] == listing


def crash_in_place(raws: list[dict[str, Any]], index: int, exits: int, last: dict[str, Any]) -> None:
    raws[index]["status"]["containerStatuses"][0].update(
        restartCount=exits, lastState=last, state={"running": {}}
    )


def test_the_planner_restarts_the_group_once_per_in_place_crash() -> None:
    body, pods = running_inference(replicas=1)  # backoffSeconds 10
    for i, raw in enumerate(pods):
        raw["metadata"]["uid"] = f"g0-{i}"
    crash_in_place(pods, 1, 1, exited(137))
    plan = step(body, pods, 20)
    assert reasons(plan).count("ContainerRestarted") == 1 and body["status"]["phase"] == "Restarting"
    group = body["status"]["groups"][0]
    assert group["containerRestarts"] == [
        {"pod": "llm-r0-1", "uid": "g0-1", "terminations": 1, "completed": False}
    ]
    # Reconciles during the backoff, and the worker crashing again meanwhile: still one pending failure.
    for t in (21, 22, 25):
        plan = step(body, pods, t)
        assert "ContainerRestarted" not in reasons(plan) and plan.delete_pods == []
    crash_in_place(pods, 1, 2, exited(1))
    step(body, pods, 26)
    plan = step(body, pods, 30)
    assert reasons(plan).count("GroupRestarted") == 1 and body["status"]["restarts"] == 1
    assert sorted(plan.delete_pods) == ["llm-r0-0", "llm-r0-1"]
    assert plan.pod_uids == {"llm-r0-0": "g0-0", "llm-r0-1": "g0-1"}  # only those incarnations
    assert body["status"]["groups"][0]["containerRestarts"] == []

    # The new generation: same names, new uids, restartCount 0. Old exits are history, not failures.
    fresh = group_pods(body, 0, restart=1, created=40)
    for i, raw in enumerate(fresh):
        raw["metadata"]["uid"] = f"g1-{i}"
    for t in (45, 50):
        plan = step(body, fresh, t)
        assert body["status"]["phase"] == "Running" and body["status"]["restarts"] == 1
    # A pod of the old generation seen only in a watch event: neither Restarting nor a deletion.
    ghost = dataclasses.replace(observe_pod(pods[1]), listed=False)
    plan = plan_reconcile(JobView.from_body(body), [*(observe_pod(p) for p in fresh), ghost], at(55))
    assert plan.delete_pods == [] and plan.status.phase == "Running"
