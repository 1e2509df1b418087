"""The largest durations the schema admits: the operator renders them into a pod the API server takes
and reconciles with them, from the start through a failure to the end, without overflowing."""

from __future__ import annotations

from typing import Any

import pytest
from conveyor.kube_formats import MAX_SECONDS
from conveyor.spec import SpecError, parse_spec
from conveyor_operator import k8s, render
from conveyor_operator.observe import observe_pod
from conveyor_operator.plan import JobView
from conveyor_operator.reconcile import plan_reconcile

from tests.operator.builders import at, complete, fail, group_pods, inference_spec, job_body

INT32_MAX = 2**31 - 1

LONGEST = inference_spec(
    ttlSecondsAfterFinished=MAX_SECONDS,
    restartPolicy={
        "backoffLimit": 3,
        "backoffSeconds": MAX_SECONDS,
        "maxBackoffSeconds": MAX_SECONDS,
        "startupTimeoutSeconds": MAX_SECONDS,
    },
    checkpoint={"volume": "ckpt", "path": "/ckpt", "staleAfterSeconds": MAX_SECONDS},
    failurePolicy={"hangTimeoutSeconds": MAX_SECONDS},
    placement={"unschedulableTimeoutSeconds": MAX_SECONDS},
)


def step(body: dict[str, Any], pods: list[dict[str, Any]], seconds: float) -> None:
    plan = plan_reconcile(JobView.from_body(body), [observe_pod(p) for p in pods], at(seconds))
    body["status"] = k8s.status_patch(plan.status)


def test_the_longest_startup_budget_is_a_probe_threshold_a_pod_takes() -> None:
    spec = parse_spec(LONGEST)
    group = render.groups("llm", spec)[0]
    sts = render.build_statefulset(render.JobRef("llm", "ml", "uid"), spec, group, restart=0, running=True)
    probe = sts["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert 0 < probe["failureThreshold"] <= INT32_MAX  # the pod's field is int32


def test_the_longest_durations_reconcile_from_start_to_end() -> None:
    body = job_body(LONGEST)
    step(body, [], 0)
    pods = group_pods(body)
    step(body, pods, 10)
    assert body["status"]["phase"] == "Running"
    step(body, [fail(pods[0]), *pods[1:]], 20)  # the restart waits its (longest) backoff
    assert body["status"]["phase"] == "Restarting"
    step(body, [complete(p) for p in group_pods(body)], 30)
    assert body["status"]["phase"] in ("Restarting", "Succeeded")


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("restartPolicy.startupTimeoutSeconds", MAX_SECONDS + 1),
        ("placement.unschedulableTimeoutSeconds", MAX_SECONDS + 1),
        ("ttlSecondsAfterFinished", 10**14),
        ("serve.rollout.maxSurge", 1025),
    ],
)
def test_longer_is_refused_naming_the_field(path: str, value: int) -> None:
    spec = inference_spec()
    if path.startswith("serve."):
        spec = {**spec, "mode": "serve", "serve": {}}
        spec.pop("inference")
    node = spec
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    with pytest.raises(SpecError, match=rf"spec\.{path}: Input should be less than or equal to"):
        parse_spec(spec)
