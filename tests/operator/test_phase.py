"""The phase machine's pure pieces: pod observation, failure detection by kind, group and job phase,
conditions, and the backoff arithmetic."""

from __future__ import annotations

import pytest
from conveyor.job_status import Condition, Phase
from conveyor.spec import RestartPolicySpec
from conveyor_operator.backoff import budget_left, restart_delay
from conveyor_operator.observe import observe_pod
from conveyor_operator.phase import conditions, detect_failure, group_phase, job_phase, split_pods
from conveyor_operator.restarts import account_group

from tests.operator.builders import at, complete, evict, fail, group_pods, inference_spec, job_body

POLICY = RestartPolicySpec.model_validate({"startupTimeoutSeconds": 100})


def _pods(restart: int = 0, ready: bool = True, created: float = 0):  # type: ignore[no-untyped-def]
    return group_pods(job_body(inference_spec(stages=3)), 0, restart=restart, ready=ready, created=created)


def _split(raw, restart: int = 0):  # type: ignore[no-untyped-def]
    """Group llm-r0 (3 stages) as the phase machine sees it, against the template hash of the spec."""
    template_hash = _pods()[0]["metadata"]["annotations"]["conveyor.dev/template-hash"]
    return split_pods([observe_pod(p) for p in raw], "llm-r0", 3, restart, template_hash)


def test_observe_reads_completion_and_checkpoint_from_the_termination_message() -> None:
    pod = observe_pod(complete(_pods()[0], step=12))
    assert (
        pod.completed
        and pod.failure is None
        and pod.last_checkpoint == {"step": 12, "time": "2026-11-23T12:00:00Z"}
    )
    assert pod.index == 0 and pod.group == "llm-r0" and pod.restart == 0


def test_observe_exit_zero_without_completed_is_neither() -> None:
    raw = _pods()[0]
    raw["status"]["containerStatuses"][0]["lastState"] = {"terminated": {"exitCode": 0, "message": "bye"}}
    pod = observe_pod(raw)
    assert not pod.completed and pod.failure is None


def test_observe_failure_kinds() -> None:
    assert observe_pod(fail(_pods()[0])).failure.reason == "ContainerRestarted"  # type: ignore[union-attr]
    assert observe_pod(fail(_pods()[0], restarted=False)).failure.reason == "PodFailed"  # type: ignore[union-attr]
    assert observe_pod(evict(_pods()[0])).failure.reason == "PodEvicted"  # type: ignore[union-attr]
    failed = _pods()[0]
    failed["status"]["phase"] = "Failed"
    assert observe_pod(failed).failure.reason == "PodFailed"  # type: ignore[union-attr]


def test_split_sorts_pods_by_generation() -> None:
    pods = _pods()
    old = _pods(restart=0)[0]
    old["metadata"]["annotations"]["conveyor.dev/template-hash"] = "stale"
    members = _split(pods[1:] + [old])
    assert [p.name for p in members.current] == ["llm-r0-1", "llm-r0-2"] and [
        p.name for p in members.outdated
    ] == ["llm-r0-0"]
    members = _split(pods, restart=1)
    assert len(members.previous) == 3 and members.current == []


def disrupt(pod: dict) -> dict:
    """What the Eviction API (or a preemption, a drain) leaves on a pod before it goes."""
    pod["metadata"]["deletionTimestamp"] = "2026-11-23T12:00:15Z"
    condition = {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
    pod["status"]["conditions"].append(condition)
    return pod


@pytest.mark.parametrize(
    ("mutate", "running_since", "now", "reason"),
    [
        (lambda p: fail(p[2]), None, 1, "ContainerRestarted"),
        # the evicted rank is going; its peer already failed on the lost connection: the cause is named
        (lambda p: (disrupt(p[1]), fail(p[2])), 10, 20, "Disrupted"),
        (lambda p: evict(p[1]), 10, 20, "PodEvicted"),
        (lambda p: p.pop(), 10, 20, "PodDeleted"),
        (lambda p: p[1]["metadata"].update(creationTimestamp="2026-11-23T12:00:30Z"), 10, 40, "PodDeleted"),
        (
            lambda p: [q["status"]["conditions"][1].update(status="False") for q in p],
            None,
            100,
            "StartupTimeout",
        ),
    ],
    ids=["crash", "disrupted", "evicted", "deleted", "replaced", "startup-timeout"],
)
def test_detect_each_failure_kind(mutate, running_since, now, reason) -> None:  # type: ignore[no-untyped-def]
    pods = _pods()
    mutate(pods)
    split = _split(pods)
    container_failure, _ = account_group(split.live, [])
    failure = detect_failure(
        split,
        3,
        start_time=at(0),
        running_since=at(running_since) if running_since is not None else None,
        policy=POLICY,
        now=at(now),
        container_failure=container_failure,
    )
    assert (
        failure is not None
        and failure.reason == reason
        and failure.time == at(now).strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    assert reason == "StartupTimeout" or "llm-r0-" in failure.message  # the message names the pod


def test_no_failure_for_a_healthy_or_still_loading_group() -> None:
    assert (
        detect_failure(_split(_pods()), 3, start_time=at(0), running_since=at(5), policy=POLICY, now=at(500))
        is None
    )
    loading = _pods(ready=False)
    assert (
        detect_failure(_split(loading), 3, start_time=at(0), running_since=None, policy=POLICY, now=at(99))
        is None
    )


def test_startup_timeout_message_names_the_knob() -> None:
    failure = detect_failure(
        _split(_pods(ready=False)), 3, start_time=at(0), running_since=None, policy=POLICY, now=at(100)
    )
    assert failure is not None and "startupTimeoutSeconds" in failure.message and "0 of 3" in failure.message


def test_group_phase() -> None:
    assert group_phase(_split(_pods()), 3, failing=False) == Phase.RUNNING
    assert group_phase(_split(_pods(ready=False)), 3, failing=False) == Phase.STARTING
    assert group_phase(_split(_pods()[:2]), 3, failing=False) == Phase.STARTING
    assert group_phase(_split([]), 3, failing=False) == Phase.PENDING
    assert group_phase(_split([complete(p) for p in _pods()]), 3, failing=False) == Phase.SUCCEEDED
    mixed = _pods()
    complete(mixed[0])
    assert group_phase(_split(mixed), 3, failing=False) == Phase.RUNNING
    assert group_phase(_split(_pods()), 3, failing=True) == Phase.RESTARTING
    assert group_phase(_split(_pods(), restart=1), 3, failing=False) == Phase.RESTARTING
    unscheduled = _pods(ready=False)
    for p in unscheduled:
        p["spec"] = {}
        p["status"]["conditions"][0]["status"] = "False"
    assert group_phase(_split(unscheduled), 3, failing=False) == Phase.PENDING


@pytest.mark.parametrize(
    ("groups", "completes", "expected"),
    [
        ([Phase.RUNNING, Phase.RESTARTING], True, Phase.RESTARTING),
        ([Phase.SUCCEEDED, Phase.SUCCEEDED], True, Phase.SUCCEEDED),
        ([Phase.SUCCEEDED, Phase.SUCCEEDED], False, Phase.RUNNING),
        ([Phase.SUCCEEDED, Phase.RUNNING], True, Phase.RUNNING),
        ([Phase.PENDING, Phase.PENDING], True, Phase.PENDING),
        ([Phase.PENDING, Phase.RUNNING], True, Phase.STARTING),
        ([], False, Phase.RUNNING),  # serve scaled to zero
    ],
)
def test_job_phase(groups: list[Phase], completes: bool, expected: Phase) -> None:
    assert job_phase(groups, completes=completes) == expected


@pytest.mark.parametrize(
    ("phase", "ready", "reconciling", "stalled"),
    [
        (Phase.RUNNING, "True", "False", "False"),
        (Phase.SUCCEEDED, "True", "False", "False"),
        (Phase.PENDING, "False", "True", "False"),
        (Phase.STARTING, "False", "True", "False"),
        (Phase.RESTARTING, "False", "True", "False"),
        (Phase.FAILED, "False", "False", "True"),
        (Phase.SUSPENDED, "False", "False", "False"),
    ],
)
def test_conditions_by_phase(phase: Phase, ready: str, reconciling: str, stalled: str) -> None:
    conds = {
        c.type: c for c in conditions(phase, reason="R", message="m", generation=7, previous=[], now=at(0))
    }
    assert (conds["Ready"].status, conds["Reconciling"].status, conds["Stalled"].status) == (
        ready,
        reconciling,
        stalled,
    )
    assert all(c.observed_generation == 7 for c in conds.values())


def test_condition_transition_time_moves_only_on_status_change() -> None:
    old = [Condition(type="Ready", status="False", reason="Starting", last_transition_time="T-old")]
    same = conditions(Phase.STARTING, reason="Starting", message="", generation=1, previous=old, now=at(5))
    assert same[0].last_transition_time == "T-old"
    moved = conditions(Phase.RUNNING, reason="Running", message="", generation=1, previous=old, now=at(5))
    assert moved[0].last_transition_time == "2026-11-23T12:00:05Z"


@pytest.mark.parametrize(
    ("base", "cap", "done", "expected"),
    [
        (10, 300, 0, 10),
        (10, 300, 1, 20),
        (10, 300, 4, 160),
        (10, 300, 5, 300),
        (10, 300, 50, 300),
        (0, 0, 3, 0),
        (1, 1000, 10, 1000),
        (7, 7, 0, 7),
    ],
)
def test_restart_delay(base: int, cap: int, done: int, expected: float) -> None:
    policy = RestartPolicySpec.model_validate({"backoffSeconds": base, "maxBackoffSeconds": cap})
    assert restart_delay(policy, done) == expected


def test_restart_delay_rejects_negative_counts() -> None:
    with pytest.raises(ValueError, match="restarts_done"):
        restart_delay(RestartPolicySpec(), -1)


def test_budget() -> None:
    policy = RestartPolicySpec.model_validate({"backoffLimit": 2})
    assert [budget_left(policy, n) for n in range(4)] == [True, True, False, False]
    assert not budget_left(RestartPolicySpec.model_validate({"backoffLimit": 0}), 0)


def test_no_startup_timeout_while_waiting_for_capacity() -> None:
    pods = _pods(ready=False)
    pods[2]["spec"] = {}
    pods[2]["status"]["conditions"][0]["status"] = "False"
    assert (
        detect_failure(_split(pods), 3, start_time=at(0), running_since=None, policy=POLICY, now=at(10_000))
        is None
    )


def test_replacement_is_judged_on_the_api_servers_clock() -> None:
    # The operator's clock runs 5 s behind: running_since (operator) is before the pods' creation
    # (API server), but the newest member's creationTimestamp recorded at readiness tells the truth.
    pods = _pods(created=10)
    kwargs = {"start_time": at(0), "policy": POLICY, "now": at(20)}
    assert detect_failure(_split(pods), 3, running_since=at(5), members_since=at(10), **kwargs) is None  # type: ignore[arg-type]
    pods[0]["metadata"]["creationTimestamp"] = "2026-11-23T12:00:15Z"
    failure = detect_failure(_split(pods), 3, running_since=at(5), members_since=at(10), **kwargs)  # type: ignore[arg-type]
    assert failure is not None and failure.reason == "PodDeleted" and "llm-r0-0" in failure.message
