"""A PipelineJob's status: written by the operator only, read by ``kubectl``, dashboards and the
operator's next reconcile. The CRD's status schema is generated from these models (``conveyor crd``)."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class Phase(StrEnum):
    PENDING = "Pending"
    STARTING = "Starting"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class _Status(BaseModel):
    # Status is written by the operator; unknown keys are ignored, not refused, so an older operator can
    # read a newer status during an upgrade.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, use_enum_values=True)


class SkippedCheckpoint(_Status):
    """A checkpoint the workers passed over when resuming, because it was partial or corrupt."""

    name: str = Field(description="Its directory, e.g. `step-40`.")
    step: int | None = None
    reason: str = Field("", description="What was wrong with it, e.g. a file shorter than at its commit.")
    time: str | None = Field(None, description="When a worker skipped it (RFC 3339).")


class CheckpointRef(_Status):
    step: int = Field(ge=0, description="Step (train) or committed prompt offset (inference).")
    time: str | None = Field(None, description="When it was committed (RFC 3339).")
    age_seconds: int | None = Field(
        None, description="Its age at the last reconcile, in whole minutes (refreshed once a minute)."
    )
    interval_seconds: float | None = Field(
        None, description="Observed time per checkpoint.every steps, from the last two checkpoints seen."
    )
    skipped: int | None = Field(
        None,
        description="Checkpoints the workers skipped as partial or corrupt when resuming (they resumed "
        "from the last good one instead), over the job's life.",
    )
    last_skipped: SkippedCheckpoint | None = Field(None, description="The newest of them, and why.")


class Condition(_Status):
    """A Kubernetes-style condition (metav1.Condition)."""

    type: str = Field(description="`Ready`, `Reconciling` or `Stalled`.")
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(description="CamelCase reason, e.g. `BackoffLimitExceeded`.")
    message: str = ""
    observed_generation: int | None = None
    last_transition_time: str | None = None


class GroupFailure(_Status):
    reason: str = Field(
        description="PodFailed, ContainerRestarted, PodEvicted, PodDeleted, StartupTimeout or Hung."
    )
    message: str = ""
    time: str = Field(
        description="When the operator saw it (RFC 3339); the restart waits the backoff from here."
    )
    action: str | None = Field(None, description="What spec.failurePolicy decided for it.")
    rule: str | None = Field(None, description="The failurePolicy rule that matched, and for which pod.")


class ContainerRestarts(_Status):
    """How far the operator has accounted one pod's in-place container restarts (its watermark)."""

    pod: str = Field(description="The pod's name.")
    uid: str = Field("", description="The pod's uid: a pod recreated under the same name starts from 0.")
    terminations: int = Field(
        0, ge=0, description="Worker container exits already accounted (restartCount, +1 while terminated)."
    )
    completed: bool = Field(
        False, description="The worker reported completion: later exits are a finished worker's re-exits."
    )


class GroupStatus(_Status):
    """One restart unit: a replica's group (inference, serve) or the whole job (train)."""

    name: str = Field(description="The group's StatefulSet.")
    replica: int | None = Field(
        None, description="The replica it serves; absent for a train job's one group."
    )
    phase: Phase = Phase.PENDING
    pods: int = Field(0, description="Pods of the current generation that exist.")
    ready_pods: int = 0
    restarts: int = Field(0, description="Times the operator restarted this group (its CONVEYOR_RESTART).")
    start_time: str | None = Field(None, description="When the current generation was started.")
    running_since: str | None = Field(None, description="When every pod of the group was first seen ready.")
    members_since: str | None = Field(
        None, description="Newest pod creation time when the group became ready; a later pod replaced one."
    )
    failure: GroupFailure | None = Field(None, description="A failure waiting for its backoff to end.")
    last_checkpoint: CheckpointRef | None = Field(
        None, description="Newest checkpoint this group's workers reported (in their termination messages)."
    )
    resumed_from: CheckpointRef | None = Field(None, description="Checkpoint the last restart resumed from.")
    container_restarts: list[ContainerRestarts] = Field(
        default_factory=list,
        description="Pods of the current generation whose worker exited in place, and how far each is accounted.",
    )


class ResolvedSpec(_Status):
    """Values the operator resolved from defaults (never written back into the spec, for GitOps)."""

    gpus_per_pod: int = 0
    micro_batches: int = 1
    pods_per_group: int = 1
    template_hash: str = ""


class DrainingGroup(_Status):
    name: str = Field(description="The group's StatefulSet.")
    since: str = Field(description="When it was taken out of the Service (RFC 3339).")
    reason: Literal["Rollout", "ScaleDown"] = "Rollout"


class FleetStatus(_Status):
    """A serve job's replicas behind its Service, and its rollout (docs/operator.md, "Serve fleets")."""

    ready_replicas: int = Field(0, description="Replicas whose every pod is ready.")
    serving_replicas: int = Field(0, description="Replicas whose entry pod the Service selects.")
    updated_replicas: int = Field(0, description="Replicas on the current template.")
    strategy: Literal["Surge", "InPlace"] | None = Field(
        None, description="The running rollout: extra replicas first (Surge), or one out at a time (InPlace)."
    )
    surge_replicas: int = Field(0, description="Extra replicas the rollout started beyond spec replicas.")
    surge_since: str | None = Field(
        None,
        description="Since when a surge replica has waited for its pods to be scheduled (none: all are).",
    )
    message: str | None = None
    draining: list[DrainingGroup] = Field(
        default_factory=list, description="Groups out of the Service, stopped once their drain time passed."
    )


class PipelineJobStatus(_Status):
    phase: Phase = Phase.PENDING
    reason: str | None = Field(
        None, description="Why the job is in its phase (CamelCase), e.g. BackoffLimitExceeded."
    )
    message: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    layout: str | None = Field(None, description="stages x tensorParallel x replicas, e.g. `4x2x1`.")
    replicas: int = Field(0, description="Replica groups that exist (scale subresource).")
    selector: str | None = Field(None, description="Label selector of the job's pods (scale subresource).")
    ready: str | None = Field(None, description="Ready groups / groups, e.g. `1/2`.")
    ready_groups: int = 0
    groups: list[GroupStatus] = Field(default_factory=list)
    restarts: int = Field(
        0, description="Group restarts so far, all groups together (compared to backoffLimit)."
    )
    last_checkpoint: CheckpointRef | None = None
    start_time: str | None = None
    completion_time: str | None = None
    resolved: ResolvedSpec | None = None
    fleet: FleetStatus | None = Field(None, description="Serve mode: replicas behind the Service, rollout.")
