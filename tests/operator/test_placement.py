"""spec.placement rendered: pod affinity within a group's topology domain, anti-affinity for exclusive
domains, Kueue's labels and annotations, Volcano PodGroups; and the errors for bad input."""

from __future__ import annotations

from typing import Any

import pytest
from conveyor.spec import SpecError, parse_spec
from conveyor_operator import placement, render

from tests.operator.builders import inference_spec, serve_spec, train_spec

JOB = render.JobRef(name="llm", namespace="ml", uid="uid-1")
RACK = "example.com/rack"


def _statefulsets(spec_doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        o for o in render.build_all(JOB, parse_spec(spec_doc), {}, running=True) if o["kind"] == "StatefulSet"
    ]


def _pod(sts: dict[str, Any]) -> dict[str, Any]:
    template: dict[str, Any] = sts["spec"]["template"]
    return template


def test_required_domain_is_pod_affinity_to_the_groups_own_pods() -> None:
    spec = inference_spec(stages=3, replicas=2, placement={"topologyKey": RACK})
    ids = []
    for sts in _statefulsets(spec):
        pod = _pod(sts)
        own = pod["metadata"]["labels"][placement.PLACEMENT_LABEL]
        ids.append(own)
        terms = pod["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms == [
            {"labelSelector": {"matchLabels": {placement.PLACEMENT_LABEL: own}}, "topologyKey": RACK}
        ]
        assert "podAntiAffinity" not in pod["spec"]["affinity"]
        assert "preferredDuringSchedulingIgnoredDuringExecution" not in pod["spec"]["affinity"]["podAffinity"]
    assert len(set(ids)) == 2  # each replica is its own group: no affinity between replicas


def test_train_job_is_one_group_across_replicas_and_stages() -> None:
    (sts,) = _statefulsets(train_spec(stages=2, replicas=3, placement={"topologyKey": RACK}))
    assert sts["spec"]["replicas"] == 6
    assert placement.PLACEMENT_LABEL in _pod(sts)["metadata"]["labels"]


def test_preferred_domain_is_a_weighted_preference() -> None:
    (sts,) = _statefulsets(inference_spec(placement={"topologyKey": RACK, "mode": "Preferred"}))
    affinity = _pod(sts)["spec"]["affinity"]["podAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in affinity
    (term,) = affinity["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["weight"] == placement.PREFERRED_WEIGHT
    assert term["podAffinityTerm"]["topologyKey"] == RACK


def test_exclusive_keeps_every_other_group_out_of_the_domain_in_any_namespace() -> None:
    spec = inference_spec(replicas=2, placement={"topologyKey": RACK, "exclusive": True})
    for sts in _statefulsets(spec):
        pod = _pod(sts)
        own = pod["metadata"]["labels"][placement.PLACEMENT_LABEL]
        (term,) = pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == RACK
        assert term["namespaceSelector"] == {}
        assert term["labelSelector"]["matchExpressions"] == [
            {"key": placement.PLACEMENT_LABEL, "operator": "Exists"},
            {"key": placement.PLACEMENT_LABEL, "operator": "NotIn", "values": [own]},
        ]


def test_same_group_name_in_another_namespace_is_another_group() -> None:
    assert placement.placement_id("a", "llm-r0") != placement.placement_id("b", "llm-r0")
    assert len(placement.placement_id("a", "x" * 60)) <= 63


def test_user_affinity_is_kept_and_placement_terms_appended() -> None:
    node = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}
    mine = {"labelSelector": {"matchLabels": {"app": "cache"}}, "topologyKey": "kubernetes.io/hostname"}
    user = {**node, "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [mine]}}
    doc = inference_spec(template={"affinity": user}, placement={"topologyKey": RACK})
    spec = parse_spec(doc)
    (sts,) = _statefulsets(doc)
    affinity = _pod(sts)["spec"]["affinity"]
    assert affinity["nodeAffinity"] == node["nodeAffinity"]
    terms = affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms[0] == mine and terms[1]["topologyKey"] == RACK
    assert spec.template.affinity == user  # the spec itself is not modified


def test_without_placement_nothing_is_added() -> None:
    (sts,) = _statefulsets(inference_spec())
    pod = _pod(sts)
    assert "affinity" not in pod["spec"]
    assert not any(k.startswith(("kueue.", "conveyor.dev/placement")) for k in pod["metadata"]["labels"])
    assert placement.VOLCANO_GROUP_ANNOTATION not in pod["metadata"]["annotations"]
    assert not [
        o
        for o in render.build_all(JOB, parse_spec(inference_spec()), {}, running=True)
        if o["kind"] == "PodGroup"
    ]


@pytest.mark.parametrize(
    ("mode", "annotation"),
    [("Required", placement.KUEUE_REQUIRED_TOPOLOGY), ("Preferred", placement.KUEUE_PREFERRED_TOPOLOGY)],
)
def test_kueue_queue_and_topology_request(mode: str, annotation: str) -> None:
    (sts,) = _statefulsets(
        inference_spec(placement={"topologyKey": RACK, "mode": mode, "queueName": "team-a"})
    )
    assert sts["metadata"]["labels"][placement.KUEUE_QUEUE_LABEL] == "team-a"
    pod = _pod(sts)
    assert pod["metadata"]["labels"][placement.KUEUE_QUEUE_LABEL] == "team-a"
    assert pod["metadata"]["annotations"][annotation] == RACK
    other = {placement.KUEUE_REQUIRED_TOPOLOGY, placement.KUEUE_PREFERRED_TOPOLOGY} - {annotation}
    assert not other & set(pod["metadata"]["annotations"])


def test_kueue_queue_without_topology_has_no_topology_request() -> None:
    (sts,) = _statefulsets(inference_spec(placement={"queueName": "team-a"}))
    annotations = _pod(sts)["metadata"]["annotations"]
    assert not {placement.KUEUE_REQUIRED_TOPOLOGY, placement.KUEUE_PREFERRED_TOPOLOGY} & set(annotations)
    assert "affinity" not in _pod(sts)["spec"]


@pytest.mark.parametrize(
    ("doc", "sizes"),
    [
        (
            inference_spec(stages=3, replicas=2, template={"schedulerName": "volcano"}),
            {"llm-r0": 3, "llm-r1": 3},
        ),
        (train_spec(stages=2, replicas=2, template={"schedulerName": "volcano"}), {"llm": 4}),
    ],
)
def test_volcano_gets_one_podgroup_per_group_with_the_groups_size(
    doc: dict[str, Any], sizes: dict[str, int]
) -> None:
    objects = render.build_all(JOB, parse_spec(doc), {}, running=True)
    podgroups = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PodGroup"}
    assert {n: pg["spec"]["minMember"] for n, pg in podgroups.items()} == sizes
    for pg in podgroups.values():
        assert pg["apiVersion"] == "scheduling.volcano.sh/v1beta1"
        assert pg["metadata"]["ownerReferences"][0]["uid"] == JOB.uid
    kinds = [o["kind"] for o in objects]
    assert max(i for i, k in enumerate(kinds) if k == "PodGroup") < kinds.index("StatefulSet")
    for sts in (o for o in objects if o["kind"] == "StatefulSet"):
        pod = _pod(sts)
        assert pod["spec"]["schedulerName"] == "volcano"
        assert pod["metadata"]["annotations"][placement.VOLCANO_GROUP_ANNOTATION] == sts["metadata"]["name"]


def test_serve_surge_groups_get_their_podgroup() -> None:
    spec = parse_spec(serve_spec(replicas=1, template={"schedulerName": "volcano"}))
    surge = render.GroupRef(name="llm-r1", replica=1, pods=2)
    (pg,) = render.build_podgroups(JOB, spec, [surge])
    assert pg["metadata"]["name"] == "llm-r1" and pg["spec"]["minMember"] == 2


def test_placement_stays_out_of_the_workers_spec_but_changes_the_template_hash() -> None:
    plain = parse_spec(inference_spec())
    placed = parse_spec(inference_spec(placement={"topologyKey": RACK}))
    assert render.worker_spec(placed) == render.worker_spec(plain)
    assert render.template_hash(placed) != render.template_hash(plain)
    # Unset placement leaves the hash of existing jobs as it was (no roll at the operator's upgrade).
    assert render.template_hash(parse_spec(inference_spec(placement={}))) == render.template_hash(plain)


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ({"exclusive": True}, "spec.placement: placement.exclusive needs placement.topologyKey"),
        (
            {"topologyKey": "rack name"},
            "spec.placement.topologyKey: topologyKey 'rack name' is not a node label key",
        ),
        (
            {"topologyKey": RACK, "mode": "Always"},
            "spec.placement.mode: Input should be 'Required' or 'Preferred'",
        ),
        ({"unschedulableTimeoutSeconds": 1}, "spec.placement.unschedulableTimeoutSeconds"),
        ({"topologyKeys": RACK}, "spec.placement.topologyKeys: unknown field"),
    ],
)
def test_bad_placement_names_the_field_and_the_fix(bad: dict[str, Any], says: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(inference_spec(placement=bad))
    assert says in str(err.value)
