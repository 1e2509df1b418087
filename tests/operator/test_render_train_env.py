"""A train job's pods carry torchrun's per-node names (WORLD_SIZE, LOCAL_WORLD_SIZE, NODE_RANK) that
agree with the ranks `conveyor worker` derives; other modes' pods do not."""

from __future__ import annotations

from conveyor.env import PodEnv
from conveyor.spec import parse_spec
from conveyor_operator import render

from tests.operator.builders import inference_spec, train_spec
from tests.operator.test_render import JOB, _environ


def test_train_pods_have_the_launcher_names_matching_their_ranks() -> None:
    spec = parse_spec(train_spec(stages=2, tp=2, replicas=3))
    (sts,) = render.build_statefulsets(JOB, spec, {}, running=True)
    for index in range(sts["spec"]["replicas"]):
        env = _environ(sts, index)
        pod = PodEnv.from_environ(env)
        assert env["WORLD_SIZE"] == str(pod.world_size) == "12"
        assert env["LOCAL_WORLD_SIZE"] == "2"
        assert env["NODE_RANK"] == str(index)
        assert int(pod.rank_environ(0)["RANK"]) == int(env["NODE_RANK"]) * 2  # T ranks per node


def test_inference_pods_do_not() -> None:
    spec = parse_spec(inference_spec(stages=2, tp=1, replicas=1))
    for sts in render.build_statefulsets(JOB, spec, {}, running=True):
        assert "NODE_RANK" not in _environ(sts, 0)
