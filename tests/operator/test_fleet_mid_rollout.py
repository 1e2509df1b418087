"""A serve fleet's rollout when something else happens in its middle: a group rolled while others wait,
replicas scaled up, down or to zero, a group restarting after a failure. The random walks of
test_fleet_rollout_properties.py found these; each is pinned here as the smallest story that shows it."""

from __future__ import annotations

from conveyor.spec import parse_spec
from conveyor_operator import render

from tests.operator.builders import fail
from tests.operator.test_fleet import DRAIN, Cluster, fleet, fleet_spec, roll_to_end, running


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


def test_scaled_back_up_before_its_drain_ended_a_group_serves_again() -> None:
    cluster = running(3)
    cluster.body["spec"]["parallelism"]["replicas"] = 1
    cluster.step()
    assert sorted(d["name"] for d in fleet(cluster)["draining"]) == ["llm-r1", "llm-r2"]
    cluster.body["spec"]["parallelism"]["replicas"] = 3  # an autoscaler changes its mind within drainSeconds
    cluster.step()
    cluster.step(DRAIN)
    assert cluster.deleted_sets == [] and fleet(cluster)["draining"] == []
    assert cluster.serving() == {"llm-r0", "llm-r1", "llm-r2"}


def test_scale_to_zero_and_back_serves_every_replica_again() -> None:
    cluster = running(2)
    cluster.body["spec"]["parallelism"]["replicas"] = 0
    cluster.step()
    assert cluster.serving() == set() and cluster.body["status"]["ready"] == "0/0"
    cluster.step(DRAIN)
    assert sorted(cluster.deleted_sets) == ["llm-r0", "llm-r1"]
    cluster.body["spec"]["parallelism"]["replicas"] = 2
    cluster.step()
    cluster.all_ready()
    cluster.step()
    cluster.step()
    assert cluster.serving() == {"llm-r0", "llm-r1"} and fleet(cluster)["draining"] == []
    assert cluster.body["status"]["phase"] == "Running" and cluster.body["status"]["ready"] == "2/2"


def test_scaling_down_mid_rollout_shrinks_the_surge_to_the_new_replicas() -> None:
    # maxSurge 3 at 3 replicas: 3 surge groups; scaled to 1, a rollout may hold 1 + min(3, 1) groups.
    cluster = running(3, surge=3)
    cluster.body["spec"] = fleet_spec(3, image="conveyor:2", surge=3)
    cluster.step()
    assert fleet(cluster)["surgeReplicas"] == 3
    cluster.body["spec"]["parallelism"]["replicas"] = 1
    cluster.step()
    assert fleet(cluster)["surgeReplicas"] == 1
    # llm-r1 is the surge now (the old template still, serving); the rest go, the 2 just asked for too
    leaving = {d["name"] for d in fleet(cluster)["draining"]}
    assert {"llm-r2", "llm-r3", "llm-r4", "llm-r5"} <= leaving and "llm-r1" not in leaving, fleet(cluster)
    cluster.step(DRAIN)
    assert {"llm-r2", "llm-r3", "llm-r4", "llm-r5"} <= set(cluster.deleted_sets)
    roll_to_end(cluster, render.template_hash(parse_spec(cluster.body["spec"])), at_least=1)
    assert sorted(cluster.sets) == ["llm-r0"]


def test_a_group_taken_out_for_the_rollout_that_becomes_the_surge_is_rolled_not_stuck() -> None:
    # 3 replicas: llm-r2 is taken out to roll; scaled to 2, its place is the surge's. Left draining it
    # would never serve, and with maxUnavailable 0 no other replica could ever be taken out.
    cluster = running(3)
    cluster.body["spec"] = fleet_spec(3, image="conveyor:2")
    cluster.step()
    cluster.all_ready()
    cluster.step()
    cluster.step()
    assert [d["name"] for d in fleet(cluster)["draining"]] == ["llm-r2"]
    cluster.body["spec"]["parallelism"]["replicas"] = 2
    cluster.step()
    plan = cluster.step(DRAIN)
    assert sorted(plan.delete_pods) == ["llm-r2-0", "llm-r2-1"]  # rolled to the new template
    roll_to_end(cluster, render.template_hash(parse_spec(cluster.body["spec"])), at_least=2)
    assert sorted(cluster.sets) == ["llm-r0", "llm-r1"]


def test_a_group_scaled_away_whose_place_becomes_the_surge_serves_as_the_surge() -> None:
    # Scaled 3 -> 1, then a new image within drainSeconds: llm-r1 is draining away and is the surge's
    # place now. Left draining it never serves, and with maxUnavailable 0 llm-r0 could never be rolled.
    cluster = running(3)
    cluster.body["spec"]["parallelism"]["replicas"] = 1
    cluster.step()
    cluster.body["spec"] = fleet_spec(1, image="conveyor:2")
    cluster.step()
    assert fleet(cluster)["strategy"] == "Surge" and "llm-r1" not in cluster.deleted_sets
    roll_to_end(cluster, render.template_hash(parse_spec(cluster.body["spec"])), at_least=1)
    assert sorted(cluster.sets) == ["llm-r0"]


def test_a_surge_group_whose_pods_never_appear_sends_the_rollout_in_place() -> None:
    # A ResourceQuota or an admission webhook refuses the surge's pods: none ever exists, as unschedulable.
    cluster = running(2)
    cluster.body["spec"] = fleet_spec(2, image="conveyor:2")
    cluster.step()
    cluster.step(30)
    assert fleet(cluster)["strategy"] == "Surge"
    plan = cluster.step(31)
    assert fleet(cluster)["strategy"] == "InPlace" and "RolloutInPlace" in [e.reason for e in plan.events]


def surge_placed_long_ago(replicas: int = 2) -> Cluster:
    """A surge rollout whose surge group was scheduled and serves, 70 s after it was asked for."""
    cluster = running(replicas)
    cluster.body["spec"] = fleet_spec(replicas, image="conveyor:2")
    cluster.step()
    cluster.all_ready()
    cluster.step()
    cluster.step(70)
    assert fleet(cluster)["strategy"] == "Surge"
    return cluster


def test_a_surge_group_asked_for_after_a_scale_up_gets_its_own_time_to_be_scheduled() -> None:
    cluster = surge_placed_long_ago()
    cluster.body["spec"]["parallelism"]["replicas"] = 3  # llm-r2 a replica now, llm-r3 the new surge
    cluster.step()
    assert fleet(cluster)["strategy"] == "Surge" and "llm-r3" in cluster.sets, fleet(cluster)
    cluster.create_missing(scheduled=False)
    cluster.step(61)
    assert fleet(cluster)["strategy"] == "InPlace"  # no room for it after all


def test_a_surge_group_restarting_after_it_was_placed_keeps_the_rollout_surging() -> None:
    cluster = surge_placed_long_ago()
    del cluster.pods["llm-r2-1"]  # the surge group loses a rank and restarts
    cluster.step()
    assert cluster.body["status"]["groups"][2]["restarts"] == 1
    cluster.step()  # its pods not back yet
    assert fleet(cluster)["strategy"] == "Surge", fleet(cluster)
    roll_to_end(cluster, render.template_hash(parse_spec(cluster.body["spec"])), at_least=2)


def test_scaling_down_keeps_a_serving_group_until_the_remaining_replicas_serve() -> None:
    # maxUnavailable 0: scaled 3 -> 1 while llm-r0 restarts, llm-r1 and llm-r2 are all that serve. One of
    # them stays in the Service until llm-r0 is back (a ReplicaSet would delete the unready pod instead).
    cluster = running(3)
    del cluster.pods["llm-r0-1"]
    cluster.step()
    assert cluster.serving() == {"llm-r1", "llm-r2"}
    cluster.body["spec"]["parallelism"]["replicas"] = 1
    cluster.step()
    assert cluster.serving() == {"llm-r1"} and [d["name"] for d in fleet(cluster)["draining"]] == ["llm-r2"]
    cluster.step(DRAIN)
    assert cluster.serving() == {"llm-r1"} and cluster.deleted_sets == ["llm-r2"]
    cluster.all_ready()
    cluster.step()
    cluster.step()
    assert cluster.serving() == {"llm-r0"} and [d["name"] for d in fleet(cluster)["draining"]] == ["llm-r1"]
    cluster.step(DRAIN)
    assert cluster.deleted_sets == ["llm-r2", "llm-r1"] and fleet(cluster)["draining"] == []


def test_the_surge_stays_until_every_replica_serves_not_only_runs() -> None:
    # llm-r0, taken out to roll, restarts after a failure and comes back on the new template before its
    # drain ended: it runs, but is still out of the Service. The surge must not go before it is back.
    cluster = running(2)
    cluster.body["spec"] = fleet_spec(2, image="conveyor:2")
    cluster.step()
    cluster.all_ready()
    cluster.step()
    cluster.step()
    cluster.step(DRAIN)  # llm-r1 rolled
    cluster.all_ready()
    cluster.step()
    assert [d["name"] for d in fleet(cluster)["draining"]] == ["llm-r0"]
    del cluster.pods["llm-r0-1"]
    cluster.step()
    assert cluster.body["status"]["groups"][0]["restarts"] == 1
    cluster.all_ready()
    cluster.step()
    assert cluster.serving() == {"llm-r1", "llm-r2"}, fleet(cluster)
    roll_to_end(cluster, render.template_hash(parse_spec(cluster.body["spec"])), at_least=2)


def backing_off(spec: dict) -> dict:
    spec["restartPolicy"] = {"backoffLimit": 5, "backoffSeconds": 10, "maxBackoffSeconds": 10}
    return spec


def test_a_group_waiting_to_restart_is_replaced_once_by_its_restart_on_the_new_template() -> None:
    cluster = running(2)
    cluster.body["spec"] = backing_off(fleet_spec(2))
    cluster.step()
    fail(cluster.pods["llm-r0-1"])
    cluster.step()
    assert cluster.body["status"]["groups"][0]["failure"]["reason"] == "ContainerRestarted"
    cluster.body["spec"] = backing_off(fleet_spec(2, image="conveyor:2"))
    plan = cluster.step()
    # not rolled on its own: its restart, when the backoff ends, replaces every pod with the new template
    assert plan.delete_pods == [] and "GroupRolled" not in [e.reason for e in plan.events]
    assert cluster.body["status"]["groups"][0]["phase"] == "Restarting"
    plan = cluster.step(10)
    assert sorted(plan.delete_pods) == ["llm-r0-0", "llm-r0-1"]
    assert [e.reason for e in plan.events].count("GroupRolled") == 0
    new_hash = render.template_hash(parse_spec(cluster.body["spec"]))
    cluster.create_missing()
    assert cluster.hashes()["llm-r0"] == {new_hash}
    roll_to_end(cluster, new_hash, at_least=1)
    status = cluster.body["status"]
    assert status["restarts"] == 1 and [g["restarts"] for g in status["groups"]] == [1, 0]


def test_a_group_restarted_as_the_spec_changes_is_deleted_once_and_counted_once() -> None:
    cluster = running(2)
    fail(cluster.pods["llm-r0-1"])
    cluster.body["spec"] = fleet_spec(2, image="conveyor:2")
    plan = cluster.step()  # the failure seen, the restart due at once (backoff 0), and a new template
    assert sorted(plan.delete_pods) == ["llm-r0-0", "llm-r0-1"]
    assert [e.reason for e in plan.events].count("GroupRestarted") == 1
    assert "GroupRolled" not in [e.reason for e in plan.events]
    assert cluster.body["status"]["groups"][0]["phase"] == "Restarting"
    new_hash = render.template_hash(parse_spec(cluster.body["spec"]))
    roll_to_end(cluster, new_hash, at_least=1)
    status = cluster.body["status"]
    assert status["restarts"] == 1 and [g["restarts"] for g in status["groups"]] == [1, 0]


def test_a_group_taken_out_to_roll_that_fails_is_replaced_once_by_its_restart() -> None:
    cluster = running(2)
    cluster.body["spec"] = backing_off(fleet_spec(2, image="conveyor:2"))
    cluster.step()
    cluster.all_ready()
    cluster.step()
    cluster.step()
    assert [d["name"] for d in fleet(cluster)["draining"]] == ["llm-r1"]
    fail(cluster.pods["llm-r1-0"])
    cluster.step()
    plan = cluster.step(DRAIN)  # drained, but its restart is due in 10 s: that replaces its pods
    assert plan.delete_pods == [] and fleet(cluster)["draining"] == []
    plan = cluster.step(10)
    assert sorted(plan.delete_pods) == ["llm-r1-0", "llm-r1-1"]
    assert "GroupRolled" not in [e.reason for e in plan.events]
    roll_to_end(cluster, render.template_hash(parse_spec(cluster.body["spec"])), at_least=1)
    assert cluster.body["status"]["restarts"] == 1
