"""What a group restart says it resumes from: the best checkpoint the operator has been told of (a group's
own record in status, any pod's termination message, the job's record for a train job), and never "the
start" when it simply was not told."""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

from conveyor.job_status import CheckpointRef
from conveyor_operator import progress
from conveyor_operator.observe import merge_witness, observe_pod
from conveyor_operator.plan import JobView, Plan
from conveyor_operator.reconcile import plan_reconcile

from tests.operator.builders import at, fail, group_pods, inference_spec, job_body, stamp, train_spec
from tests.operator.test_reconcile import step


def _report(step_: int) -> str:
    return json.dumps({"lastCheckpoint": {"step": step_, "time": stamp(0)}})


def _restart_messages(plan: Plan) -> list[str]:
    return [e.message for e in plan.events if e.reason == "GroupRestarted"]


def _pod(group: str, ck: Any) -> Any:
    pod = group_pods(job_body(inference_spec()), 0)[0]
    obs = observe_pod(pod)
    return dataclasses.replace(obs, group=group, last_checkpoint=ck)


# ---- the pure functions ----


def test_newest_takes_the_highest_step_and_ignores_missing() -> None:
    a, b = CheckpointRef(step=3, time="t3"), CheckpointRef(step=9, time="t9")
    assert progress.newest([None, a, b, None]) == b
    assert progress.newest([b, CheckpointRef(step=9, time="later")]) == b  # equal: the earlier record stays
    assert progress.newest([None]) is None


def test_malformed_reports_are_ignored() -> None:
    for bad in ({"step": "7"}, {"step": -1}, {"step": True}, {"time": "t"}, {}):
        assert progress.reported(_pod("g", bad)) is None
    assert progress.reported(_pod("g", {"step": 7, "time": 5})) == CheckpointRef(step=7, time=None)


def test_a_group_counts_only_its_own_pods() -> None:
    pods = [_pod("llm-r0", {"step": 40}), _pod("llm-r1", {"step": 5})]
    assert progress.group_checkpoint("llm-r1", [None], pods) == CheckpointRef(step=5)
    assert progress.group_checkpoint("llm-r1", [CheckpointRef(step=8)], pods) == CheckpointRef(step=8)
    assert progress.job_checkpoint(None, pods) == CheckpointRef(step=40)


def test_the_message_never_claims_a_fresh_start() -> None:
    unknown = progress.describe_resume(None)
    assert "start" not in unknown and "none reported" in unknown
    known = progress.describe_resume(CheckpointRef(step=12, time="2026-11-23T12:00:00Z"))
    assert known.startswith("checkpoint step 12 or later") and "2026-11-23T12:00:00Z" in known


def test_a_checkpoint_seen_only_in_a_watch_event_is_kept() -> None:
    pod = group_pods(job_body(train_spec()), 0)[0]
    seen = copy.deepcopy(fail(copy.deepcopy(pod), message=_report(30)))  # exit 1, reported step 30
    listed = copy.deepcopy(seen)
    cs = listed["status"]["containerStatuses"][0]
    # A second exit since the event, without a report: lastState now shows only that one.
    cs.update(restartCount=2, lastState={"terminated": {"exitCode": 1, "reason": "Error", "message": ""}})
    merged = merge_witness(observe_pod(listed), observe_pod(seen))
    assert observe_pod(listed).last_checkpoint is None
    assert merged.last_checkpoint is not None and merged.last_checkpoint["step"] == 30


def test_a_malformed_report_seen_in_a_watch_event_does_not_win() -> None:
    """merge_witness keeps the newest well-formed report (the rule progress.reported applies): a
    malformed step seen in an event does not hide the listing's step 0."""
    pod = group_pods(job_body(train_spec()), 0)[0]
    seen = fail(copy.deepcopy(pod), message=json.dumps({"lastCheckpoint": {"step": True}}))
    listed = fail(copy.deepcopy(pod), message=_report(0))
    listed["status"]["containerStatuses"][0]["restartCount"] = 2  # a later exit, which reported step 0
    merged = merge_witness(observe_pod(listed), observe_pod(seen))
    assert len(merged.terminations) == 2
    assert progress.reported(merged) == CheckpointRef(step=0, time=stamp(0))


# ---- through the reconcile ----


def _running_train() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    body = job_body(train_spec())
    step(body, [], 0)
    pods = group_pods(body, 0)
    step(body, pods, 1)
    assert body["status"]["phase"] == "Running"
    return body, pods


def test_a_restart_without_any_report_says_none_was_reported() -> None:
    body, pods = _running_train()
    plan = step(body, [fail(pods[0])] + pods[1:], 2)
    (message,) = _restart_messages(plan)
    assert "resuming from the latest committed checkpoint (none reported yet" in message
    assert "the start" not in message


def test_a_later_restart_names_the_checkpoint_an_earlier_exit_reported() -> None:
    # Restart 1: a rank exits reporting step 30. Restart 2: a pod is deleted, nobody reports anything.
    body, pods = _running_train()
    step(body, [fail(pods[0], message=_report(30))] + pods[1:], 2)
    assert body["status"]["groups"][0]["lastCheckpoint"]["step"] == 30
    fresh = group_pods(body, 0, restart=1, created=3)
    step(body, fresh, 4)
    assert body["status"]["phase"] == "Running"
    plan = step(body, fresh[1:], 20)  # pod llm-0 gone while running
    (message,) = _restart_messages(plan)
    assert "after PodDeleted" in message and "resuming from checkpoint step 30 or later" in message
    assert body["status"]["groups"][0]["resumedFrom"]["step"] == 30


def test_a_train_job_status_from_an_older_operator_is_used() -> None:
    body, pods = _running_train()
    body["status"]["lastCheckpoint"] = {"step": 25, "time": stamp(0)}
    body["status"]["groups"][0].pop("lastCheckpoint", None)
    (message,) = _restart_messages(step(body, [fail(pods[0])] + pods[1:], 2))
    assert "resuming from checkpoint step 25 or later" in message


def test_inference_replicas_each_resume_from_their_own_progress() -> None:
    body = job_body(inference_spec(replicas=2, restartPolicy={"backoffLimit": 5, "backoffSeconds": 0}))
    step(body, [], 0)
    r0, r1 = group_pods(body, 0), group_pods(body, 1)
    step(body, r0 + r1, 1)
    plan = step(body, [fail(r0[0], message=_report(40))] + r0[1:] + [fail(r1[0])] + r1[1:], 2)
    messages = sorted(_restart_messages(plan))
    assert len(messages) == 2
    assert "group llm-r0" in messages[0] and "checkpoint step 40 or later" in messages[0]
    assert "group llm-r1" in messages[1] and "none reported yet" in messages[1]
    assert body["status"]["lastCheckpoint"]["step"] == 40  # the job's newest, across replicas


def test_suspend_and_resume_keep_what_each_group_reported() -> None:
    body, pods = _running_train()
    step(body, [fail(pods[0], message=_report(30))] + pods[1:], 2)
    body["spec"]["suspend"] = True
    step(body, [], 10)
    assert body["status"]["groups"][0]["lastCheckpoint"]["step"] == 30
    body["spec"]["suspend"] = False
    step(body, [], 20)
    assert body["status"]["groups"][0]["lastCheckpoint"]["step"] == 30


def test_a_report_of_a_pod_seen_only_in_a_watch_event_counts() -> None:
    body, pods = _running_train()
    ghost = dataclasses.replace(observe_pod(fail(copy.deepcopy(pods[0]), message=_report(50))), listed=False)
    plan = plan_reconcile(JobView.from_body(body), [ghost, *(observe_pod(p) for p in pods[1:])], at(2))
    assert plan.status.groups[0].last_checkpoint == CheckpointRef(step=50, time=stamp(0))
    assert "checkpoint step 50 or later" in _restart_messages(plan)[0]


# ---- checkpoints the workers skipped as partial or corrupt ----

SKIP = {"name": "step-30", "step": 30, "reason": "model/__0_0.distcp is 5 bytes, 10 at commit", "time": "t"}


def test_a_report_carries_the_skipped_count_and_the_last_skip() -> None:
    ref = progress.reported(_pod("g", {"step": 20, "time": "t20", "skipped": 1, "lastSkipped": SKIP}))
    assert ref is not None and ref.skipped == 1 and ref.last_skipped is not None
    assert ref.last_skipped.name == "step-30" and "5 bytes" in ref.last_skipped.reason
    for bad in ({"skipped": "1"}, {"skipped": True}, {"skipped": 0}, {"skipped": -2}):
        ref = progress.reported(_pod("g", {"step": 20, **bad}))
        assert ref is not None and ref.skipped is None and ref.last_skipped is None
    ref = progress.reported(
        _pod("g", {"step": 20, "skipped": 2, "lastSkipped": {"name": "step-9", "step": "x"}})
    )
    assert ref is not None and ref.skipped == 2 and ref.last_skipped is not None
    assert ref.last_skipped.name == "step-9"  # a malformed field keeps what can be read


def test_newest_keeps_the_highest_skipped_count_whichever_report_has_the_newest_step() -> None:
    skipped = CheckpointRef(step=20, time="t20", skipped=1, last_skipped=SKIP)  # type: ignore[arg-type]
    later = CheckpointRef(step=35, time="t35")  # rank 0's scrape after the resume went on
    got = progress.newest([skipped, later])
    assert got is not None and got.step == 35 and got.time == "t35" and got.skipped == 1
    assert got.last_skipped is not None and got.last_skipped.name == "step-30"
    assert progress.newest([later]) == later


def test_the_skip_event_comes_once_per_new_skip() -> None:
    before = CheckpointRef(step=20)
    after = CheckpointRef(step=20, skipped=1, last_skipped=SKIP)  # type: ignore[arg-type]
    message = progress.skip_event(before, after)
    assert message is not None and "step-30 (model/__0_0.distcp is 5 bytes, 10 at commit)" in message
    assert "1 skipped" in message
    assert progress.skip_event(after, after) is None  # the next reconcile: nothing new
    assert progress.skip_event(None, before) is None and progress.skip_event(None, None) is None
    assert progress.skip_event(None, after) is not None


def test_status_shows_the_skip_and_an_event_says_so_once() -> None:
    body = job_body(train_spec(replicas=1))
    step(body, [], 0)
    pods = group_pods(body, 0)
    step(body, pods, 5)
    report = {
        "completed": False,
        "lastCheckpoint": {"step": 20, "time": stamp(4), "skipped": 1, "lastSkipped": SKIP},
    }
    failed = fail(copy.deepcopy(pods[1]), 1, message=json.dumps(report))
    plan = step(body, [pods[0], failed], 8)
    events = [e.message for e in plan.events if e.reason == "CheckpointSkipped"]
    assert len(events) == 1 and "step-30" in events[0], plan.events
    last = body["status"]["lastCheckpoint"]
    assert last["step"] == 20 and last["skipped"] == 1 and last["lastSkipped"]["name"] == "step-30"
    plan = step(body, [pods[0], failed], 9)
    assert "CheckpointSkipped" not in [e.reason for e in plan.events]
    assert body["status"]["lastCheckpoint"]["skipped"] == 1
