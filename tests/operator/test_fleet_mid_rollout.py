"""A serve fleet's rollout when something else happens in its middle: a group rolled while others wait,
replicas scaled up, down or to zero, a group restarting after a failure. The random walks of
test_fleet_rollout_properties.py found these; each is pinned here as the smallest story that shows it."""

from __future__ import annotations

from conveyor.spec import parse_spec
from conveyor_operator import render

from tests.operator.test_fleet import DRAIN, fleet, fleet_spec, running


def test_a_group_rolled_in_this_reconcile_is_not_counted_as_serving() -> None:
    # maxUnavailable 0: while llm-r1 is rolled (its pods deleted), llm-r0 must keep serving with the surge.
    cluster = running(2)
    cluster.body["spec"] = fleet_spec(2, image="conveyor:2")
    cluster.step()
    cluster.all_ready()
    cluster.step()
    cluster.step()
    assert [d["name"] for d in fleet(cluster)["draining"]] == ["llm-r1"]
    plan = cluster.step(DRAIN)
    assert sorted(plan.delete_pods) == ["llm-r1-0", "llm-r1-1"]
    assert cluster.serving() == {"llm-r0", "llm-r2"}, fleet(cluster)
    assert [d["name"] for d in fleet(cluster)["draining"]] == []
