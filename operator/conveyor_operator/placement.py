"""A group's placement, rendered (pure): ``spec.placement`` and ``template.schedulerName`` -> the pod
template's affinity, labels and annotations, and a Volcano PodGroup (docs/operating.md, "Placement").

- ``topologyKey`` + ``Required``: pod affinity to the group's own pods in that topology domain. The
  kube-scheduler places the group's first pod anywhere (a pod that matches its own affinity term may start
  a domain) and every other pod beside it;
- ``Preferred``: the same term as a preference (weight 100);
- ``exclusive``: anti-affinity to every other Conveyor group's pods, in any namespace, in that domain (in
  the same mode): a group never shares its domain;
- ``queueName``: Kueue's ``queue-name`` label on the StatefulSet and its pods, and the topology as
  Kueue's ``podset-required-topology`` / ``podset-preferred-topology`` annotation;
- ``schedulerName: volcano``: a PodGroup per group with ``minMember`` = the group's pods, named by the
  pods' ``scheduling.k8s.io/group-name`` annotation, so Volcano binds all of them or none.

The group is matched by ``PLACEMENT_LABEL``, a hash of namespace and group name: unique across
namespaces, unlike the group's name (an anti-affinity term reaches other namespaces).
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from conveyor.placement import PlacementMode, PlacementSpec
from conveyor.spec import PipelineJobSpec

PLACEMENT_LABEL = "conveyor.dev/placement-group"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_REQUIRED_TOPOLOGY = "kueue.x-k8s.io/podset-required-topology"
KUEUE_PREFERRED_TOPOLOGY = "kueue.x-k8s.io/podset-preferred-topology"
VOLCANO = "volcano"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
PREFERRED_WEIGHT = 100


def placement_id(namespace: str, group: str) -> str:
    """The group's value of PLACEMENT_LABEL (a label value: 63 characters at most)."""
    return hashlib.sha256(f"{namespace}/{group}".encode()).hexdigest()[:16]


def uses_volcano(spec: PipelineJobSpec) -> bool:
    return spec.template.scheduler_name == VOLCANO


def pod_labels(spec: PipelineJobSpec, namespace: str, group: str) -> dict[str, str]:
    """Labels the group's pods carry for placement (none without a placement or queue)."""
    p = spec.placement
    labels: dict[str, str] = {}
    if p.topology_key is not None:
        labels[PLACEMENT_LABEL] = placement_id(namespace, group)
    if p.queue_name is not None:
        labels[KUEUE_QUEUE_LABEL] = p.queue_name
    return labels


def statefulset_labels(spec: PipelineJobSpec) -> dict[str, str]:
    """Kueue's StatefulSet integration reads the queue from the StatefulSet itself too."""
    q = spec.placement.queue_name
    return {KUEUE_QUEUE_LABEL: q} if q is not None else {}


def pod_annotations(spec: PipelineJobSpec, group: str) -> dict[str, str]:
    p = spec.placement
    out: dict[str, str] = {}
    if p.queue_name is not None and p.topology_key is not None:
        key = KUEUE_REQUIRED_TOPOLOGY if p.mode == PlacementMode.REQUIRED else KUEUE_PREFERRED_TOPOLOGY
        out[key] = p.topology_key
    if uses_volcano(spec):
        out[VOLCANO_GROUP_ANNOTATION] = group
    return out


def _term(placement: PlacementSpec, selector: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"labelSelector": selector, "topologyKey": placement.topology_key, **extra}


def _add(affinity: dict[str, Any], kind: str, placement: PlacementSpec, term: dict[str, Any]) -> None:
    """Append ``term`` to the ``kind`` (podAffinity, podAntiAffinity) section, required or preferred."""
    section = affinity.setdefault(kind, {})
    if placement.mode == PlacementMode.REQUIRED:
        section.setdefault("requiredDuringSchedulingIgnoredDuringExecution", []).append(term)
    else:
        section.setdefault("preferredDuringSchedulingIgnoredDuringExecution", []).append(
            {"weight": PREFERRED_WEIGHT, "podAffinityTerm": term}
        )


def affinity(spec: PipelineJobSpec, namespace: str, group: str) -> dict[str, Any] | None:
    """The pod's affinity: the user's ``template.affinity`` with the placement's terms appended."""
    user = copy.deepcopy(spec.template.affinity) if spec.template.affinity else None
    p = spec.placement
    if p.topology_key is None:
        return user
    out: dict[str, Any] = user or {}
    own = placement_id(namespace, group)
    _add(out, "podAffinity", p, _term(p, {"matchLabels": {PLACEMENT_LABEL: own}}))
    if p.exclusive:
        others = {"matchExpressions": [{"key": PLACEMENT_LABEL, "operator": "NotIn", "values": [own]}]}
        others["matchExpressions"].insert(0, {"key": PLACEMENT_LABEL, "operator": "Exists"})
        # namespaceSelector {}: a domain is shared with no group, whatever its namespace.
        _add(out, "podAntiAffinity", p, _term(p, others, namespaceSelector={}))
    return out


def build_podgroup(metadata: dict[str, Any], spec: PipelineJobSpec, pods: int) -> dict[str, Any] | None:
    """Volcano's gang: the group's pods are bound together or not at all (``metadata`` as the group's
    StatefulSet's: same name, namespace, labels and owner)."""
    if not uses_volcano(spec):
        return None
    body: dict[str, Any] = {"minMember": pods}
    if spec.template.priority_class_name:
        body["priorityClassName"] = spec.template.priority_class_name
    return {
        "apiVersion": "scheduling.volcano.sh/v1beta1",
        "kind": "PodGroup",
        "metadata": metadata,
        "spec": body,
    }
