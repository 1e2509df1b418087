"""Desired Kubernetes objects of a PipelineJob, as pure functions: spec + identity + restart counts ->
manifests (plain dicts, applied with server-side apply by ``k8s.py``).

Objects for a job ``NAME`` (docs/operator.md):
- headless Service ``NAME``: rendezvous DNS, also for pods that are not ready yet;
- inference and serve: one StatefulSet ``NAME-r{replica}`` per replica (ordinal = stage);
  train: one StatefulSet ``NAME`` (ordinal = replica * stages + stage);
- serve: a ClusterIP Service ``NAME-serve`` on the stage-0 pods, and a PodDisruptionBudget so a drain
  takes down one group at a time.

StatefulSets use ``updateStrategy: OnDelete``: the operator decides when pods are replaced (a group
restart replaces all of a group's pods together, so that every rank rendezvouses again; a spec change
rolls one group at a time).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from conveyor.env import pod_environ
from conveyor.placement import PlacementSpec
from conveyor.spec import (
    API_VERSION,
    GPU_RESOURCE,
    KIND,
    SHM_PATH,
    Mode,
    ParallelismSpec,
    PipelineJobSpec,
    RestartPolicySpec,
    RolloutSpec,
    spec_to_json,
)

from conveyor_operator import placement

JOB_LABEL = "conveyor.dev/job"
GROUP_LABEL = "conveyor.dev/group"
REPLICA_LABEL = "conveyor.dev/replica"
STAGE_LABEL = "conveyor.dev/stage"
SERVING_LABEL = "conveyor.dev/serving"  # "true" on the entry pod of a ready, not draining serve group
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
RESTART_ANNOTATION = "conveyor.dev/restart"
TEMPLATE_HASH_ANNOTATION = "conveyor.dev/template-hash"
TERMINATION_LOG = "/dev/termination-log"
# The worker's REQUEST_TIMEOUT_SECONDS (conveyor.inference.serve, not imported: it pulls in torch): a serve
# pod stopped gracefully gets this long, after its drain, to finish the requests in flight.
SERVE_REQUEST_TIMEOUT_SECONDS = 600
WORKER_CONTAINER = "worker"
PROBE_PERIOD_SECONDS = 10


@dataclass(frozen=True)
class JobRef:
    """Who owns the objects: the PipelineJob's identity."""

    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class GroupRef:
    """A restart unit and its StatefulSet: one replica (inference, serve) or the whole job (train)."""

    name: str
    replica: int | None
    pods: int


def groups(name: str, spec: PipelineJobSpec) -> list[GroupRef]:
    p = spec.parallelism
    if spec.mode == Mode.TRAIN:
        return [GroupRef(name=name, replica=None, pods=p.replicas * p.stages)]
    return [GroupRef(name=f"{name}-r{r}", replica=r, pods=p.stages) for r in range(p.replicas)]


def layout(spec: PipelineJobSpec) -> str:
    p = spec.parallelism
    return f"{p.stages}x{p.tensor_parallel}x{p.replicas}"


def base_labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "conveyor",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "conveyor-operator",
        JOB_LABEL: name,
    }


def selector(name: str) -> str:
    """The job's pods, as a label selector string (status.selector, for the scale subresource)."""
    return f"{JOB_LABEL}={name}"


def owner_reference(job: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: JobRef, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": {**base_labels(job.name), **(labels or {})},
        "ownerReferences": [owner_reference(job)],
    }


def worker_spec(spec: PipelineJobSpec) -> PipelineJobSpec:
    """The spec the workers see (CONVEYOR_SPEC): fields only the operator acts on are reset, so that
    suspending, a new TTL, restart policy or placement never changes the pods' CONVEYOR_SPEC. The image is the container's, not
    the worker's business: it is reset too, so that a release's new default image never shows up in
    CONVEYOR_SPEC (the template hash covers the container image itself)."""
    defaults = PipelineJobSpec.model_fields
    return spec.model_copy(
        update={
            "suspend": False,
            "ttl_seconds_after_finished": None,
            "restart_policy": RestartPolicySpec(),
            "placement": PlacementSpec(),
            "checkpoint": spec.checkpoint.model_copy(update={"stale_after_seconds": None})
            if spec.checkpoint
            else None,
            "image": defaults["image"].default,
            "serve": spec.serve.model_copy(update={"rollout": RolloutSpec()}) if spec.serve else None,
        }
    )


# Bump when a change of the rendered pod template must replace running pods at the operator's upgrade
# (one group at a time per job). Any other change of the rendering reaches pods at their group's next
# restart, and an upgrade rolls nothing (docs/operator.md, "Upgrading the operator").
TEMPLATE_REVISION = 1


def template_hash(spec: PipelineJobSpec) -> str:
    """Identity of the pod template, apart from the restart count: pods with another hash are outdated and
    rolled. It covers what the user set (the worker spec without its defaults, so a release that adds a
    field with a default keeps it), the container image and ``TEMPLATE_REVISION``; not the operator's
    rendering. Serve replicas are independent endpoints, so scaling them never rolls the others."""
    worker = worker_spec(spec)
    if spec.mode == Mode.SERVE:
        replicas = ParallelismSpec.model_fields["replicas"].default
        worker = worker.model_copy(
            update={"parallelism": worker.parallelism.model_copy(update={"replicas": replicas})}
        )
    identity: dict[str, Any] = {
        "revision": TEMPLATE_REVISION,
        "image": spec.image,
        "spec": json.loads(spec_to_json(worker)),
    }
    if spec.placement != PlacementSpec():  # where pods go is part of the template (left out when unset)
        identity["placement"] = spec.placement.model_dump(by_alias=True, mode="json", exclude_defaults=True)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def master_addr(job: JobRef, group: GroupRef) -> str:
    """Rendezvous: ordinal 0 of the group, through the headless Service."""
    return f"{group.name}-0.{job.name}.{job.namespace}.svc"


def _ports(spec: PipelineJobSpec) -> list[dict[str, Any]]:
    ports = [
        {"name": "rendezvous", "containerPort": spec.master_port, "protocol": "TCP"},
        {"name": "metrics", "containerPort": spec.metrics_port, "protocol": "TCP"},
    ]
    # Local rank r serves its own metrics on metricsPort + r. Prometheus discovers a pod's declared ports
    # only, and the chart's PodMonitor keeps those named metrics / metrics-N: undeclared, ranks 1..T-1
    # were never scraped. (The probes use `metrics`, local rank 0.)
    for rank in range(1, spec.parallelism.tensor_parallel):
        ports.append(
            {"name": f"metrics-{rank}", "containerPort": spec.metrics_port + rank, "protocol": "TCP"}
        )
    if spec.serve is not None:
        ports.append({"name": "http", "containerPort": spec.serve.port, "protocol": "TCP"})
    return ports


def _volumes(spec: PipelineJobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    # NCCL and torch's shared-memory transport need a /dev/shm larger than a container's default 64 MiB.
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": SHM_PATH}]
    if spec.checkpoint is not None and spec.checkpoint.volume:
        volumes.append({"name": "checkpoint", "persistentVolumeClaim": {"claimName": spec.checkpoint.volume}})
        mounts.append({"name": "checkpoint", "mountPath": spec.checkpoint.path})
    if spec.model is not None and spec.model.volume:
        volumes.append(
            {"name": "model", "persistentVolumeClaim": {"claimName": spec.model.volume, "readOnly": True}}
        )
        mounts.append({"name": "model", "mountPath": spec.model.mount_path, "readOnly": True})
    if spec.cache is not None:
        source = (
            {"persistentVolumeClaim": {"claimName": spec.cache.volume}}
            if spec.cache.volume
            else {"emptyDir": {}}
        )
        volumes.append({"name": "compile-cache", **source})
        mounts.append({"name": "compile-cache", "mountPath": spec.cache.path})
    return volumes + list(spec.template.volumes), mounts + list(spec.template.volume_mounts)


def _resources(spec: PipelineJobSpec) -> dict[str, Any]:
    limits = dict(spec.resources.limits)
    requests = dict(spec.resources.requests)
    if spec.gpus_per_pod > 0:
        limits[GPU_RESOURCE] = str(spec.gpus_per_pod)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _env(job: JobRef, spec: PipelineJobSpec, group: GroupRef, restart: int) -> list[dict[str, Any]]:
    values = pod_environ(
        job=job.name,
        spec=worker_spec(spec),
        replica=group.replica or 0,
        stage=0,
        master_addr=master_addr(job, group),
        master_port=spec.master_port,
        restart=restart,
        checkpoint_dir=spec.checkpoint.path if spec.checkpoint is not None else None,
        compile_cache=spec.cache.path if spec.cache is not None else None,
    )
    env: list[dict[str, Any]] = []
    for key, value in values.items():
        if key == "CONVEYOR_REPLICAS" and spec.mode == Mode.SERVE and group.replica is not None:
            # A rollout's surge replica (fleet.py) has an index beyond spec replicas; the worker checks it.
            value = str(max(int(value), group.replica + 1))
        if key == "CONVEYOR_POD_INDEX":
            # The ordinal differs per pod of one template: the downward API gives each pod its own.
            ref = {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}}
            env.append({"name": key, "valueFrom": ref})
        else:
            env.append({"name": key, "value": value})
    env.append({"name": "CONVEYOR_TERMINATION_LOG", "value": TERMINATION_LOG})
    if spec.mode == Mode.TRAIN:
        # torchrun's and DeepSpeed's launcher's per-node names, for tools in the pod; `conveyor worker` sets
        # each rank's RANK, LOCAL_RANK and the rest (env.rank_environ) from these same numbers.
        p = spec.parallelism
        env.append({"name": "WORLD_SIZE", "value": str(p.replicas * p.stages * p.tensor_parallel)})
        env.append({"name": "LOCAL_WORLD_SIZE", "value": str(p.tensor_parallel)})
        node_rank = {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}}
        env.append({"name": "NODE_RANK", "valueFrom": node_rank})
    # The pod's generation beyond its restart count (a new image keeps the workers' spec): ranks of an
    # outdated template never rendezvous with the current one. Read from the pod's own annotation, the one
    # the operator judges it by.
    ref = {"fieldRef": {"fieldPath": f"metadata.annotations['{TEMPLATE_HASH_ANNOTATION}']"}}
    env.append({"name": "CONVEYOR_TEMPLATE_HASH", "valueFrom": ref})
    return env + list(spec.template.env)


def _container(job: JobRef, spec: PipelineJobSpec, group: GroupRef, restart: int) -> dict[str, Any]:
    volumes_mounts = _volumes(spec)[1]
    startup_budget = spec.restart_policy.startup_timeout_seconds
    container: dict[str, Any] = {
        "name": WORKER_CONTAINER,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["conveyor", "worker"],
        "env": _env(job, spec, group, restart),
        "ports": _ports(spec),
        "volumeMounts": volumes_mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        # Loading a large model takes minutes: the startup probe gives it the whole startup budget
        # instead of a liveness kill; past it the operator restarts the group with a clear reason.
        "startupProbe": {
            "tcpSocket": {"port": "metrics"},
            "periodSeconds": PROBE_PERIOD_SECONDS,
            "failureThreshold": max(1, -(-startup_budget // PROBE_PERIOD_SECONDS)),
        },
        # Ready = local rank 0 joined the world (all ranks connected) and loaded its shard: the worker's
        # /ready, not the metrics port, which is open from the start.
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "metrics"},
            "periodSeconds": PROBE_PERIOD_SECONDS,
        },
    }
    hang = spec.failure_policy.hang_timeout_seconds
    if hang is not None:  # the worker's /live turns 503 after `hang` seconds without progress (watchdog.py)
        container["livenessProbe"] = {
            "httpGet": {"path": "/live", "port": "metrics"},
            "periodSeconds": PROBE_PERIOD_SECONDS,
            "failureThreshold": 1,
        }
        container["env"].append({"name": "CONVEYOR_HANG_TIMEOUT", "value": str(hang)})
    resources = _resources(spec)
    if resources:
        container["resources"] = resources
    if spec.serve is not None and spec.serve.rollout.drain_seconds > 0:
        # A pod deleted by anyone (a node drain, kubectl) keeps serving while the endpoints drop it, and
        # only then gets SIGTERM (the worker finishes its in-flight requests and stops).
        container["lifecycle"] = {"preStop": {"sleep": {"seconds": spec.serve.rollout.drain_seconds}}}
    return container


def _pod_spec(job: JobRef, spec: PipelineJobSpec, group: GroupRef, restart: int) -> dict[str, Any]:
    t = spec.template
    pod: dict[str, Any] = {
        "restartPolicy": "Always",
        "containers": [_container(job, spec, group, restart)],
        "volumes": _volumes(spec)[0],
    }
    optional = {
        "nodeSelector": t.node_selector or None,
        "tolerations": t.tolerations or None,
        "affinity": placement.affinity(spec, job.namespace, group.name),
        "priorityClassName": t.priority_class_name,
        "schedulerName": t.scheduler_name,
        "serviceAccountName": t.service_account_name,
        "imagePullSecrets": t.image_pull_secrets or None,
    }
    pod.update({k: v for k, v in optional.items() if v is not None})
    if spec.serve is not None:
        pod["terminationGracePeriodSeconds"] = (
            spec.serve.rollout.drain_seconds + SERVE_REQUEST_TIMEOUT_SECONDS
        )
    return pod


def build_statefulset(
    job: JobRef, spec: PipelineJobSpec, group: GroupRef, *, restart: int, running: bool
) -> dict[str, Any]:
    """One group's StatefulSet. ``running=False`` (suspended, finished) scales it to 0 and keeps it."""
    group_labels = {GROUP_LABEL: group.name}
    if group.replica is not None:
        group_labels[REPLICA_LABEL] = str(group.replica)
    pod_labels = {
        **spec.template.labels,
        **placement.pod_labels(spec, job.namespace, group.name),
        **base_labels(job.name),
        **group_labels,
    }
    annotations = {
        **spec.template.annotations,
        **placement.pod_annotations(spec, group.name),
        RESTART_ANNOTATION: str(restart),
        TEMPLATE_HASH_ANNOTATION: template_hash(spec),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(job, group.name, {**placement.statefulset_labels(spec), **group_labels}),
        "spec": {
            "serviceName": job.name,
            "replicas": group.pods if running else 0,
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "OnDelete"},
            "selector": {"matchLabels": {JOB_LABEL: job.name, GROUP_LABEL: group.name}},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": annotations},
                "spec": _pod_spec(job, spec, group, restart),
            },
        },
    }


def placeholder_pod(spec: PipelineJobSpec) -> dict[str, Any]:
    """The pod spec the operator renders for ``spec``'s first group, under placeholder job and group
    names: for checks of what the pods mount and set, which do not depend on the job's name or restart."""
    group = GroupRef(name="job-r0", replica=None if spec.mode == Mode.TRAIN else 0, pods=1)
    job = JobRef(name="job", namespace="namespace", uid="uid")
    pod: dict[str, Any] = build_statefulset(job, spec, group, restart=0, running=True)["spec"]["template"][
        "spec"
    ]
    return pod


def build_statefulsets(
    job: JobRef, spec: PipelineJobSpec, restarts: dict[str, int], *, running: bool
) -> list[dict[str, Any]]:
    return [
        build_statefulset(job, spec, g, restart=restarts.get(g.name, 0), running=running)
        for g in groups(job.name, spec)
    ]


def build_podgroups(
    job: JobRef, spec: PipelineJobSpec, of: list[GroupRef] | None = None
) -> list[dict[str, Any]]:
    """Volcano gangs (``template.schedulerName: volcano``), one per group (``of``: the spec's groups), named
    as its StatefulSet."""
    out = []
    for g in groups(job.name, spec) if of is None else of:
        group_labels = {GROUP_LABEL: g.name}
        podgroup = placement.build_podgroup(_metadata(job, g.name, group_labels), spec, g.pods)
        if podgroup is not None:
            out.append(podgroup)
    return out


def build_service(job: JobRef, spec: PipelineJobSpec) -> dict[str, Any]:
    """Headless Service: DNS `{pod}.{NAME}.{namespace}.svc` for rendezvous, ready or not."""
    ports = [
        {"name": "rendezvous", "port": spec.master_port, "targetPort": "rendezvous", "protocol": "TCP"},
        {"name": "metrics", "port": spec.metrics_port, "targetPort": "metrics", "protocol": "TCP"},
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, job.name),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {JOB_LABEL: job.name},
            "ports": ports,
        },
    }


def build_serve_service(job: JobRef, spec: PipelineJobSpec) -> dict[str, Any] | None:
    """Serve mode's endpoint: the entry (stage 0) pod of every ready group that is not draining (the
    operator sets SERVING_LABEL, see fleet.py)."""
    if spec.serve is None:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, f"{job.name}-serve"),
        "spec": {
            "type": "ClusterIP",
            "selector": {JOB_LABEL: job.name, STAGE_LABEL: "0", SERVING_LABEL: "true"},
            "ports": [{"name": "http", "port": spec.serve.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_pdb(job: JobRef, spec: PipelineJobSpec) -> dict[str, Any] | None:
    """Serve with several replicas: a drain evicts one pod (so one group) at a time and the rest keep
    serving. Batch jobs get none: blocking drains would only trade a restart from checkpoint for a stuck
    node."""
    if spec.mode != Mode.SERVE or spec.parallelism.replicas < 2:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(job, job.name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {JOB_LABEL: job.name}}},
    }


def build_all(
    job: JobRef, spec: PipelineJobSpec, restarts: dict[str, int], *, running: bool
) -> list[dict[str, Any]]:
    """Every object of the job, in apply order (Service first: pods resolve their peers through it)."""
    objects = [build_service(job, spec)]
    optional = [build_serve_service(job, spec), build_pdb(job, spec)]
    objects += [o for o in optional if o is not None]
    # A PodGroup before its pods: Volcano holds pods whose group does not exist yet.
    objects += build_podgroups(job, spec)
    return objects + build_statefulsets(job, spec, restarts, running=running)


def pod_stage_labels(spec: PipelineJobSpec, group: GroupRef, pod_index: int) -> dict[str, str]:
    """The replica and stage labels of one pod (one template serves all of a group's pods, so the operator
    adds them to each pod after it exists)."""
    stages = spec.parallelism.stages
    if group.replica is None:
        replica, stage = divmod(pod_index, stages)
    else:
        replica, stage = group.replica, pod_index
    return {REPLICA_LABEL: str(replica), STAGE_LABEL: str(stage)}
