"""``spec.placement``: where a group's pods may land (the API part).

A group (one replica's StatefulSet, or a train job's one StatefulSet: every stage and tensor-parallel
rank) talks over its fastest links only inside one topology domain: a rack, an NVLink domain, a zone.
``topologyKey`` names the node label of that domain; the operator renders it as pod affinity to the
group's own pods (``required`` or ``preferred``), and ``exclusive`` as anti-affinity to every other
group, so one domain holds one group. The rendering is ``conveyor_operator.placement`` (pure functions).

Queueing is left to the cluster's own schedulers: ``queueName`` puts Kueue's ``queue-name`` label on the
group's StatefulSet and pods (with the topology as Kueue's topology-aware scheduling request), and
``template.schedulerName: volcano`` makes the operator create a Volcano PodGroup per group (gang
scheduling). Without a gang scheduler a group that cannot be placed whole is reported in the
``Unschedulable`` condition after ``unschedulableTimeoutSeconds``.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from conveyor.kube_formats import LABEL_KEY, MAX_SECONDS, LabelValue


class _Spec(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_enum_values=True
    )


class PlacementMode(StrEnum):
    REQUIRED = "Required"  # a group that does not fit one domain stays Pending (and is reported)
    PREFERRED = "Preferred"  # the scheduler packs a group into one domain when it can


class PlacementSpec(_Spec):
    topology_key: str | None = Field(
        None,
        max_length=317,
        # The CRD checks it at admission with the same pattern; the validator below gives the model's message.
        json_schema_extra={"pattern": LABEL_KEY.pattern},
        description="Node label of the topology domain a group's pods share (e.g. `topology.kubernetes.io/zone`, "
        "a rack or NVLink domain label).",
    )
    mode: PlacementMode = Field(
        PlacementMode.REQUIRED,
        description="`Required`: the group's pods only in one domain; `Preferred`: one domain when possible.",
    )
    exclusive: bool = Field(
        False, description="One group per domain: no pod of another Conveyor group in the same domain."
    )
    queue_name: LabelValue | None = Field(
        None,
        description="Kueue LocalQueue: set as the `kueue.x-k8s.io/queue-name` label on the groups' StatefulSets "
        "and pods, with topologyKey as Kueue's podset topology request.",
    )
    unschedulable_timeout_seconds: int = Field(
        300,
        ge=10,
        le=MAX_SECONDS,
        description="A group with a pod unschedulable this long is reported in the Unschedulable condition.",
    )

    @field_validator("topology_key")
    @classmethod
    def _label_key(cls, key: str | None) -> str | None:
        if key is not None and not LABEL_KEY.match(key):
            raise ValueError(
                f"topologyKey {key!r} is not a node label key: write `prefix/name` or `name` "
                "(e.g. `topology.kubernetes.io/zone`)"
            )
        return key

    @model_validator(mode="after")
    def _exclusive_needs_key(self) -> PlacementSpec:
        if self.exclusive and self.topology_key is None:
            raise ValueError(
                "placement.exclusive needs placement.topologyKey: add the node label of the domain a group "
                "should have to itself"
            )
        return self
