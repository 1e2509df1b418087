"""A serve fleet through the reconcile planner, against a simulated StatefulSet controller: the Service
selects only entry pods of groups whose every pod is ready and that are not draining; rolling updates go
group by group within maxSurge / maxUnavailable (Surge, else InPlace when the surge cannot be scheduled);
a scale-down drains the highest groups before it deletes them; Reconciling shows the rollout."""

from __future__ import annotations

import copy
from typing import Any

from conveyor.spec import parse_spec
from conveyor_operator import k8s, render
from conveyor_operator.observe import observe_pod
from conveyor_operator.plan import JobView, Plan
from conveyor_operator.reconcile import plan_reconcile

from tests.operator.builders import at, job_body, serve_spec

DRAIN = 5


def fleet_spec(replicas: int = 2, *, image: str = "conveyor:1", surge: int = 1, unavailable: int = 0) -> dict:
    spec = serve_spec(stages=2, tp=1, replicas=replicas, image=image)
    spec["serve"]["rollout"] = {"maxSurge": surge, "maxUnavailable": unavailable, "drainSeconds": DRAIN}
    return spec


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386, as the API server applies the operator's status patch: null deletes, objects merge."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_patch(out[key], value)
        else:
            out[key] = value
    return out


class Cluster:
    """The job's pods as the StatefulSet controller and kubelet would keep them: a deleted pod is gone and
    comes back (created, not ready) from its StatefulSet's template; labels the operator sets stay."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.pods: dict[str, dict[str, Any]] = {}
        self.sets: dict[str, dict[str, Any]] = {}  # StatefulSets applied: name -> template spec
        self.now = 0.0
        self.deleted_sets: list[str] = []

    def step(self, seconds: float = 1.0) -> Plan:
        self.now += seconds
        plan = plan_reconcile(
            JobView.from_body(self.body), [observe_pod(p) for p in self.pods.values()], at(self.now)
        )
        self.body["status"] = merge_patch(self.body.get("status") or {}, k8s.status_patch(plan.status))
        for obj in plan.apply:
            if obj["kind"] == "StatefulSet":
                self.sets[obj["metadata"]["name"]] = obj
        for pod, labels in plan.label_pods.items():
            if pod in self.pods:
                self.pods[pod]["metadata"]["labels"].update(labels)
        for pod in plan.delete_pods:
            self.pods.pop(pod, None)
        for name in plan.delete_statefulsets:
            self.deleted_sets.append(name)
            self.sets.pop(name, None)
            self.pods = {
                n: p for n, p in self.pods.items() if p["metadata"]["labels"][render.GROUP_LABEL] != name
            }
        self.check_service()
        return plan

    def create_missing(self, *, ready: bool = False, scheduled: bool = True) -> None:
        """Pods of every StatefulSet that lack one, from its current template."""
        for name, sts in self.sets.items():
            for index in range(sts["spec"]["replicas"]):
                if f"{name}-{index}" not in self.pods:
                    self.create_pod(name, index, ready=ready, scheduled=scheduled)

    def create_pod(self, group: str, index: int, *, ready: bool = False, scheduled: bool = True) -> None:
        """Pod ``index`` of the group's StatefulSet, from its current template."""
        template = self.sets[group]["spec"]["template"]
        pod_name = f"{group}-{index}"
        labels = {**template["metadata"]["labels"], render.POD_INDEX_LABEL: str(index)}
        self.pods[pod_name] = {
            "metadata": {
                "name": pod_name,
                "namespace": "ml",
                "uid": f"{pod_name}-{self.now}",
                "labels": labels,
                "annotations": dict(template["metadata"]["annotations"]),
                "creationTimestamp": at(self.now).strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
            "spec": {"nodeName": "node-1"} if scheduled else {},
            "status": {"phase": "Running" if scheduled else "Pending", "conditions": []},
        }
        self.set_ready(pod_name, ready, scheduled=scheduled)

    def set_ready(self, pod: str, ready: bool = True, *, scheduled: bool = True) -> None:
        self.pods[pod]["status"]["conditions"] = [
            {"type": "PodScheduled", "status": "True" if scheduled else "False"},
            {"type": "Ready", "status": "True" if ready else "False"},
        ]
        self.pods[pod]["status"]["containerStatuses"] = [
            {
                "name": "worker",
                "ready": ready,
                "restartCount": 0,
                "state": {"running": {}} if scheduled else {},
            }
        ]

    def all_ready(self) -> None:
        self.create_missing()
        for name in self.pods:
            self.set_ready(name)

    def serving(self) -> set[str]:
        """Groups whose entry pod the Service selects (its selector, and the pod Ready, as the endpoints do)."""
        selector = render.build_serve_service(render.JobRef("llm", "ml", "u"), parse_spec(self.body["spec"]))
        assert selector is not None
        wanted = selector["spec"]["selector"]
        return {
            p["metadata"]["labels"][render.GROUP_LABEL]
            for p in self.pods.values()
            if all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"]["conditions"])
        }

    def check_service(self) -> None:
        """The Service never selects a group that is not whole and ready."""
        for group in self.serving():
            members = [p for p in self.pods.values() if p["metadata"]["labels"][render.GROUP_LABEL] == group]
            assert len(members) == 2, f"{group} serves with {len(members)} of 2 pods"
            assert all(c["status"] == "True" for p in members for c in p["status"]["conditions"]), group

    def hashes(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for p in self.pods.values():
            group = p["metadata"]["labels"][render.GROUP_LABEL]
            out.setdefault(group, set()).add(p["metadata"]["annotations"][render.TEMPLATE_HASH_ANNOTATION])
        return out


def running(replicas: int = 2, **rollout: Any) -> Cluster:
    cluster = Cluster(job_body(fleet_spec(replicas, **rollout)))
    cluster.step()
    cluster.all_ready()
    cluster.step()
    cluster.step()  # labels set on the first pass are seen on the next
    assert cluster.body["status"]["phase"] == "Running"
    return cluster


def fleet(cluster: Cluster) -> dict[str, Any]:
    return cluster.body["status"]["fleet"]


def condition(cluster: Cluster, type_: str) -> dict[str, Any]:
    return next(c for c in cluster.body["status"]["conditions"] if c["type"] == type_)


def test_the_service_selects_entry_pods_of_whole_ready_groups_only() -> None:
    cluster = Cluster(job_body(fleet_spec(2)))
    cluster.step()
    cluster.create_missing()
    cluster.set_ready("llm-r0-0")  # the entry rank is up, its peer not: not serving
    cluster.set_ready("llm-r1-0")
    cluster.set_ready("llm-r1-1")
    cluster.step()
    cluster.step()
    assert cluster.serving() == {"llm-r1"}
    assert cluster.body["status"]["ready"] == "1/2" and fleet(cluster)["servingReplicas"] == 1
    cluster.set_ready("llm-r0-1")
    cluster.step()
    assert cluster.serving() == {"llm-r0", "llm-r1"} and cluster.body["status"]["ready"] == "2/2"
    # A rank that stops being ready takes its replica out at once.
    cluster.set_ready("llm-r1-1", False)
    cluster.step()
    assert cluster.serving() == {"llm-r0"}


def test_a_group_restart_takes_its_replica_out_until_it_is_back() -> None:
    cluster = running(2)
    del cluster.pods["llm-r0-1"]  # a rank lost: the group restarts
    plan = cluster.step()
    assert "PodDeleted" in [e.reason for e in plan.events]
    assert cluster.serving() == {"llm-r1"}
    cluster.create_missing()
    cluster.step()
    assert cluster.serving() == {"llm-r1"}  # back, not yet ready
    cluster.all_ready()
    cluster.step()
    cluster.step()
    assert cluster.serving() == {"llm-r0", "llm-r1"}


def roll_to_end(cluster: Cluster, new_hash: str, *, at_least: int, steps: int = 40) -> list[str]:
    """Drive the rollout, pods coming up one step after their StatefulSet asks; asserts at every step that
    the Service keeps at least ``at_least`` ready groups; returns the strategies status showed."""
    seen = []
    for _ in range(steps):
        cluster.create_missing()
        cluster.step(1)
        cluster.all_ready()
        cluster.step(1)
        assert len(cluster.serving()) >= at_least, (cluster.serving(), fleet(cluster))
        seen.append(fleet(cluster).get("strategy"))
        done = all(h == {new_hash} for h in cluster.hashes().values()) and not fleet(cluster).get("strategy")
        if done and not fleet(cluster).get("draining"):
            return seen
    raise AssertionError(f"rollout did not finish: {fleet(cluster)}")


def test_surge_rollout_keeps_every_replica_serving_and_removes_the_surge_after() -> None:
    cluster = running(2)
    new_spec = fleet_spec(2, image="conveyor:2")
    cluster.body["spec"] = copy.deepcopy(new_spec)
    new_hash = render.template_hash(parse_spec(new_spec))
    plan = cluster.step()
    assert fleet(cluster)["strategy"] == "Surge" and fleet(cluster)["surgeReplicas"] == 1
    assert plan.delete_pods == [] and "llm-r2" in cluster.sets  # surge first, nothing taken out yet
    assert condition(cluster, "Reconciling")["status"] == "True"
    assert condition(cluster, "Reconciling")["reason"] == "RollingUpdate"
    assert condition(cluster, "Ready")["status"] == "True"
    strategies = roll_to_end(cluster, new_hash, at_least=2)
    assert "Surge" in strategies and "InPlace" not in strategies
    assert cluster.deleted_sets == ["llm-r2"] and sorted(cluster.hashes()) == ["llm-r0", "llm-r1"]
    assert cluster.serving() == {"llm-r0", "llm-r1"}
    assert condition(cluster, "Reconciling")["status"] == "False"
    assert cluster.body["status"]["restarts"] == 0


def test_the_highest_replica_rolls_first_and_is_drained_before_it_goes() -> None:
    cluster = running(2)
    cluster.body["spec"] = fleet_spec(2, image="conveyor:2")
    cluster.step()
    cluster.create_missing()
    cluster.all_ready()
    cluster.step()
    cluster.step()  # the surge serves: one old replica may go
    draining = [d["name"] for d in fleet(cluster)["draining"]]
    assert draining == ["llm-r1"] and cluster.serving() == {"llm-r0", "llm-r2"}
    assert "llm-r1-0" in cluster.pods, "out of the Service first, stopped after drainSeconds"
    cluster.step(DRAIN - 2)
    assert "llm-r1-0" in cluster.pods
    plan = cluster.step(2)
    assert sorted(plan.delete_pods) == ["llm-r1-0", "llm-r1-1"] and "GroupRolled" in [
        e.reason for e in plan.events
    ]


def test_without_room_for_the_surge_the_rollout_goes_in_place_one_group_at_a_time() -> None:
    cluster = running(2)
    new_spec = fleet_spec(2, image="conveyor:2")
    cluster.body["spec"] = copy.deepcopy(new_spec)
    cluster.step()
    cluster.create_missing(scheduled=False)  # the surge group's pods find no node
    cluster.step(30)
    assert fleet(cluster)["strategy"] == "Surge"
    plan = cluster.step(31)
    assert fleet(cluster)["strategy"] == "InPlace" and fleet(cluster)["surgeReplicas"] == 0
    assert "RolloutInPlace" in [e.reason for e in plan.events]
    cluster.step(DRAIN)
    assert "llm-r2" in cluster.deleted_sets
    seen = roll_to_end(cluster, render.template_hash(parse_spec(new_spec)), at_least=1)
    assert set(seen) - {None} == {"InPlace"}


def test_max_surge_above_replicas_surges_only_as_many_replicas_as_there_are() -> None:
    # As a Deployment and LeaderWorkerSet: the surge stops at spec replicas, a new template for each of
    # them; more would hold GPUs that never serve (and maxSurge stays valid when replicas are scaled down).
    cluster = running(2, surge=5)
    new_spec = fleet_spec(2, image="conveyor:2", surge=5)
    cluster.body["spec"] = copy.deepcopy(new_spec)
    cluster.step()
    assert fleet(cluster)["strategy"] == "Surge" and fleet(cluster)["surgeReplicas"] == 2
    assert sorted(cluster.sets) == ["llm-r0", "llm-r1", "llm-r2", "llm-r3"]
    assert "2 surge" in cluster.body["status"]["message"]
    roll_to_end(cluster, render.template_hash(parse_spec(new_spec)), at_least=2)
    assert sorted(cluster.deleted_sets) == ["llm-r2", "llm-r3"] and sorted(cluster.hashes()) == [
        "llm-r0",
        "llm-r1",
    ]


def test_max_surge_zero_rolls_in_place_within_max_unavailable() -> None:
    cluster = running(3, surge=0, unavailable=2)
    new_spec = fleet_spec(3, image="conveyor:2", surge=0, unavailable=2)
    cluster.body["spec"] = copy.deepcopy(new_spec)
    cluster.step()
    assert fleet(cluster)["strategy"] == "InPlace" and "llm-r3" not in cluster.sets
    assert [d["name"] for d in fleet(cluster)["draining"]] == ["llm-r2", "llm-r1"]
    assert cluster.serving() == {"llm-r0"}
    roll_to_end(cluster, render.template_hash(parse_spec(new_spec)), at_least=1)


def test_scale_down_drains_the_highest_groups_then_deletes_them() -> None:
    cluster = running(3)
    cluster.body["spec"]["parallelism"]["replicas"] = 1
    plan = cluster.step()
    assert plan.delete_statefulsets == [] and cluster.serving() == {"llm-r0"}
    assert sorted(d["name"] for d in fleet(cluster)["draining"]) == ["llm-r1", "llm-r2"]
    assert condition(cluster, "Reconciling")["reason"] == "ScaleDown"
    assert cluster.body["status"]["ready"] == "1/1"
    plan = cluster.step(DRAIN)
    assert plan.delete_statefulsets == ["llm-r2", "llm-r1"]
    cluster.step()
    assert fleet(cluster)["draining"] == [] and condition(cluster, "Reconciling")["status"] == "False"
    assert [g["name"] for g in cluster.body["status"]["groups"]] == ["llm-r0"]


def test_scaling_up_never_rolls_and_new_replicas_serve_when_whole() -> None:
    cluster = running(1)
    cluster.body["spec"]["parallelism"]["replicas"] = 2
    plan = cluster.step()
    assert plan.delete_pods == [] and fleet(cluster).get("strategy") is None
    cluster.all_ready()
    cluster.step()
    cluster.step()
    assert cluster.serving() == {"llm-r0", "llm-r1"}


def test_rollout_settings_and_the_drain_never_roll_pods_but_reach_the_pod_template() -> None:
    base = parse_spec(fleet_spec(2))
    other = parse_spec(fleet_spec(2, surge=0, unavailable=1))
    assert render.template_hash(base) == render.template_hash(other)
    group = render.groups("llm", base)[0]
    pod = render.build_statefulset(render.JobRef("llm", "ml", "u"), base, group, restart=0, running=True)
    pod_spec = pod["spec"]["template"]["spec"]
    assert pod_spec["containers"][0]["lifecycle"] == {"preStop": {"sleep": {"seconds": DRAIN}}}
    assert pod_spec["terminationGracePeriodSeconds"] == DRAIN + render.SERVE_REQUEST_TIMEOUT_SECONDS


def test_the_grace_period_covers_the_workers_request_timeout() -> None:
    from conveyor.inference.serve import REQUEST_TIMEOUT_SECONDS

    assert render.SERVE_REQUEST_TIMEOUT_SECONDS == REQUEST_TIMEOUT_SECONDS


def test_the_scale_selector_picks_one_entry_pod_per_replica() -> None:
    cluster = running(2)
    selector = cluster.body["status"]["selector"]
    assert cluster.body["status"]["replicas"] == 2
    wanted = dict(part.split("=") for part in selector.split(","))
    picked = [
        p
        for p in cluster.pods.values()
        if all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())
    ]
    assert sorted(p["metadata"]["name"] for p in picked) == ["llm-r0-0", "llm-r1-0"]


def test_a_surge_replica_beyond_spec_replicas_is_a_valid_worker() -> None:
    from conveyor.env import PodEnv

    from tests.operator.test_render import _environ

    spec = parse_spec(fleet_spec(2))
    surge = render.GroupRef(name="llm-r2", replica=2, pods=2)
    sts = render.build_statefulset(render.JobRef("llm", "ml", "u"), spec, surge, restart=0, running=True)
    pod = PodEnv.from_environ(_environ(sts, 1))
    assert (pod.replica, pod.stage) == (2, 1)


def test_suspending_mid_rollout_removes_the_surge_and_resuming_serves_the_new_template() -> None:
    cluster = running(2)
    new_spec = fleet_spec(2, image="conveyor:2")
    cluster.body["spec"] = copy.deepcopy(new_spec)
    cluster.step()
    cluster.all_ready()
    cluster.step()
    assert "llm-r2" in cluster.sets
    cluster.body["spec"]["suspend"] = True
    cluster.step()
    assert "llm-r2" in cluster.deleted_sets and "fleet" not in cluster.body["status"]
    assert {s["spec"]["replicas"] for n, s in cluster.sets.items()} == {0}
    cluster.pods.clear()  # the StatefulSets at 0
    cluster.body["spec"]["suspend"] = False
    cluster.step()
    cluster.all_ready()
    cluster.step()
    cluster.step()
    assert cluster.serving() == {"llm-r0", "llm-r1"} and fleet(cluster).get("strategy") is None
    new_hash = render.template_hash(parse_spec(new_spec))
    assert cluster.hashes() == {"llm-r0": {new_hash}, "llm-r1": {new_hash}}
