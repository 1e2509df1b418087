"""Serve-fleet rollouts as seeded random walks through the reconcile planner (no API server): spec changes,
replicas scaled up, down and to zero mid-rollout, a second spec change mid-rollout, and pods that come up,
fail or vanish at random moments. At every step the guarantees of a Deployment's rolling update hold:

- availability: the operator takes a serving group out (label, pod deletion, StatefulSet deletion) only
  while at least ``replicas - maxUnavailable`` groups keep serving (InPlace: at least 1 may go), whatever
  failures took out already, so it never removes the last ready group the promise needs;
- surge: the groups that stay (regular and surge; not those leaving, the analogue of a Deployment's
  terminating pods) are never more than ``replicas + min(maxSurge, replicas)``;
- with room in the cluster (every pod scheduled) a surge rollout never falls back to InPlace;
- the Service only selects whole, ready groups (``Cluster.check_service``);
- once the changes stop and the pods come up, the rollout finishes: exactly ``replicas`` groups, every
  pod on the newest template, all of them serving, nothing draining."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest
from conveyor.spec import parse_spec
from conveyor_operator import render
from conveyor_operator.plan import Plan

from tests.operator.builders import fail, job_body
from tests.operator.test_fleet import Cluster, fleet_spec

STAGES = 2


@dataclass(frozen=True)
class Walk:
    surge: int
    unavailable: int
    failures: bool  # pods fail or vanish at random moments
    backoff: int = 0  # seconds a failed group waits for its restart (a spec change may come meanwhile)


def spec_for(replicas: int, image: int, walk: Walk) -> dict[str, Any]:
    spec = fleet_spec(replicas, image=f"conveyor:{image}", surge=walk.surge, unavailable=walk.unavailable)
    # failures are part of the walk, not a reason to give up: the budget outlasts any walk
    spec["restartPolicy"] = {
        "backoffLimit": 1000,
        "backoffSeconds": walk.backoff,
        "maxBackoffSeconds": walk.backoff,
    }
    return spec


def replica_of(group: str) -> int:
    return int(group.rsplit("-r", 1)[1])


def truly_serving(cluster: Cluster) -> set[str]:
    """Groups the Service selects that can answer: labelled, every pod there and Ready."""
    out = set()
    for group in cluster.serving():
        members = [p for p in cluster.pods.values() if p["metadata"]["labels"][render.GROUP_LABEL] == group]
        ready = all(c["status"] == "True" for p in members for c in p["status"]["conditions"])
        if len(members) == STAGES and ready:
            out.add(group)
    return out


def beyond_the_fleet(cluster: Cluster, replicas: int) -> dict[str, bool]:
    """StatefulSets past the regular replicas and the surge status claims -> whether each drains away."""
    fleet = cluster.body["status"].get("fleet") or {}
    draining = {d["name"] for d in fleet.get("draining", [])}
    end = replicas + fleet.get("surgeReplicas", 0)
    return {
        n: n in draining for n, s in cluster.sets.items() if s["spec"]["replicas"] and replica_of(n) >= end
    }


class World:
    """The cluster around the operator: pods appear, become ready, crash or vanish at random."""

    def __init__(self, cluster: Cluster, rng: random.Random) -> None:
        self.cluster = cluster
        self.rng = rng
        self.crashed: set[str] = set()  # pod uids whose worker exited: never ready again

    def tick(self, *, failures: bool) -> None:
        pods = self.cluster.pods
        for name, pod in pods.items():
            if pod["metadata"]["uid"] not in self.crashed and self.rng.random() < 0.4:
                self.cluster.set_ready(name)
        for name, sts in self.cluster.sets.items():
            for index in range(sts["spec"]["replicas"]):
                if f"{name}-{index}" not in pods and self.rng.random() < 0.6:
                    self.cluster.create_pod(name, index)
        if failures and pods and self.rng.random() < 0.08:
            name = self.rng.choice(sorted(pods))
            if self.rng.random() < 0.5:
                fail(pods[name])
                self.crashed.add(pods[name]["metadata"]["uid"])
            else:
                del pods[name]  # a lost node: the StatefulSet brings it back later

    def settle(self) -> None:
        self.cluster.all_ready()
        for pod in self.cluster.pods.values():
            self.crashed.discard(pod["metadata"]["uid"])


def check_step(cluster: Cluster, before: set[str], walk: Walk, steps: int) -> None:
    spec = cluster.body["spec"]
    replicas = spec["parallelism"]["replicas"]
    fleet = cluster.body["status"].get("fleet") or {}
    where = f"step {steps}, replicas {replicas}, fleet {fleet}"
    after = truly_serving(cluster)
    taken_out = before - after
    in_place = walk.surge == 0
    budget = max(1, walk.unavailable) if in_place else walk.unavailable
    if taken_out:
        assert len(after) >= replicas - budget, (
            f"took {sorted(taken_out)} out leaving {sorted(after)} serving; {where}"
        )
    surge = fleet.get("surgeReplicas", 0)
    assert surge <= min(walk.surge, replicas), f"{surge} surge groups for {replicas} replicas; {where}"
    # past them only groups on their way out (a Deployment's terminating pods): draining, or kept serving
    # until the replicas serve (scaled away while a replica was down)
    for group, drains in beyond_the_fleet(cluster, replicas).items():
        assert drains or group in after, f"{group} neither a replica, the surge nor leaving; {where}"
    if not in_place:
        assert fleet.get("strategy") != "InPlace", f"fell back to InPlace with room to spare; {where}"


def check_plan(plan: Plan, steps: int) -> None:
    """A group's pods are replaced once per plan: by its restart or by its roll, never both."""
    deleted = plan.delete_pods
    assert len(deleted) == len(set(deleted)), f"pods deleted twice in one plan: {deleted}; step {steps}"
    restarted = {e.message.split()[1] for e in plan.events if e.reason == "GroupRestarted"}
    rolled = {e.message.split()[1].rstrip(":") for e in plan.events if e.reason == "GroupRolled"}
    assert not restarted & rolled, f"{sorted(restarted & rolled)} restarted and rolled; step {steps}"


def finished(cluster: Cluster) -> bool:
    spec = parse_spec(cluster.body["spec"])
    replicas = spec.parallelism.replicas
    names = {f"llm-r{i}" for i in range(replicas)}
    fleet = cluster.body["status"].get("fleet") or {}
    groups = {g["name"] for g in cluster.body["status"].get("groups", [])}
    newest = render.template_hash(spec)
    return (
        set(cluster.sets) == names
        and groups == names
        and all(h == {newest} for h in cluster.hashes().values())
        and set(cluster.hashes()) == names
        and truly_serving(cluster) == names
        and not fleet.get("strategy")
        and not fleet.get("draining")
    )


def walk_rollout(seed: int, walk: Walk, *, changes: int = 60, settle: int = 200) -> None:
    rng = random.Random(seed)
    replicas, image = rng.randint(1, 3), 1
    cluster = Cluster(job_body(spec_for(replicas, image, walk)))
    world = World(cluster, rng)
    steps = 0
    for _ in range(changes):
        world.tick(failures=walk.failures)
        roll = rng.random()
        if roll < 0.12:
            image += 1  # a new template: the first one, or a second while one rolls
        elif roll < 0.24:
            replicas = rng.choice([0, 1, 2, 3, 4])
        if roll < 0.24:
            cluster.body["spec"] = spec_for(replicas, image, walk)
        before = truly_serving(cluster)
        check_plan(cluster.step(rng.choice([1, 1, 2, 3])), steps)
        steps += 1
        check_step(cluster, before, walk, steps)
    for _ in range(settle):
        world.settle()
        before = truly_serving(cluster)
        check_plan(cluster.step(2), steps)
        steps += 1
        check_step(cluster, before, walk, steps)
        if finished(cluster):
            return
    raise AssertionError(
        f"no end after {steps} steps: sets {sorted(cluster.sets)}, hashes {cluster.hashes()}, "
        f"serving {sorted(truly_serving(cluster))}, fleet {cluster.body['status'].get('fleet')}"
    )


WALKS = [
    Walk(surge=1, unavailable=0, failures=False),
    Walk(surge=2, unavailable=0, failures=True),
    Walk(surge=1, unavailable=1, failures=True),
    Walk(surge=0, unavailable=1, failures=True),
    Walk(surge=3, unavailable=2, failures=False),
    Walk(surge=1, unavailable=0, failures=True, backoff=4),
    Walk(surge=0, unavailable=1, failures=True, backoff=4),
]


@pytest.mark.parametrize(
    "walk",
    WALKS,
    ids=lambda w: f"surge{w.surge}-unavail{w.unavailable}-fail{w.failures:d}-backoff{w.backoff}",
)
@pytest.mark.parametrize("seed", range(15))
def test_rollouts_keep_the_deployment_guarantees_at_every_step(seed: int, walk: Walk) -> None:
    walk_rollout(seed, walk)
