"""The keys of a worker pod that the operator renders itself, as the spec decides them: env var names,
volume names and mount paths; and the check that ``spec.template`` reuses none of them.

The template's ``env``, ``volumes``, ``volumeMounts`` and ``imagePullSecrets`` are appended to the
operator's own items, and server-side apply merges those lists by key (an env var's ``name``, a volume's
``name``, a mount's ``mountPath``, a pull secret's ``name``): an applied object with one key twice is
refused whole, so every apply of the job's StatefulSets would fail and the job would never start.
``PipelineJobSpec`` refuses such a template (``clashes``), and the CRD does at admission: CEL rules built
from the same tables (``cel_keys``, admission_rules.py) and list-map keys for the duplicates. The
operator's template_clashes.py checks its actual rendering as the backstop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conveyor.spec import PipelineJobSpec

# Where the operator mounts the pod's shared memory (NCCL's and torch's transports need more than 64 MiB).
SHM_PATH = "/dev/shm"


@dataclass(frozen=True)
class Owned:
    """Keys the operator renders when ``when(spec)`` holds; ``cel`` is the same condition in CEL, on the
    spec after the API server filled its defaults in."""

    keys: tuple[str, ...]
    when: Callable[[PipelineJobSpec], bool] = lambda spec: True
    cel: str = "true"


def _has_checkpoint_claim(spec: PipelineJobSpec) -> bool:
    return spec.checkpoint is not None and bool(spec.checkpoint.volume)


def _has_model_claim(spec: PipelineJobSpec) -> bool:
    return spec.model is not None and bool(spec.model.volume)


_CHECKPOINT_CLAIM = "has(self.checkpoint) && has(self.checkpoint.volume) && self.checkpoint.volume != ''"
_MODEL_CLAIM = "has(self.model) && has(self.model.volume) && self.model.volume != ''"

# render._env: conveyor.env.pod_environ's variables and the operator's own.
OPERATOR_ENV = [
    Owned(
        (
            "CONVEYOR_JOB",
            "CONVEYOR_MODE",
            "CONVEYOR_STAGES",
            "CONVEYOR_TENSOR_PARALLEL",
            "CONVEYOR_REPLICAS",
            "CONVEYOR_REPLICA",
            "CONVEYOR_POD_INDEX",
            "MASTER_ADDR",
            "MASTER_PORT",
            "CONVEYOR_RESTART",
            "CONVEYOR_SPEC",
            "CONVEYOR_TERMINATION_LOG",
            "CONVEYOR_TEMPLATE_HASH",
        )  # fmt: skip
    ),
    Owned(("CONVEYOR_CHECKPOINT_DIR",), lambda spec: spec.checkpoint is not None, "has(self.checkpoint)"),
    Owned(("CONVEYOR_COMPILE_CACHE",), lambda spec: spec.cache is not None, "has(self.cache)"),
    Owned(
        ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK"),
        lambda spec: spec.mode == "train",
        "self.mode == 'train'",
    ),
    Owned(
        ("CONVEYOR_HANG_TIMEOUT",),
        lambda spec: spec.failure_policy.hang_timeout_seconds is not None,
        "has(self.failurePolicy) && has(self.failurePolicy.hangTimeoutSeconds)",
    ),
]

# render._volumes: the volumes' names.
OPERATOR_VOLUMES = [
    Owned(("dshm",)),
    Owned(("checkpoint",), _has_checkpoint_claim, _CHECKPOINT_CLAIM),
    Owned(("model",), _has_model_claim, _MODEL_CLAIM),
    Owned(("compile-cache",), lambda spec: spec.cache is not None, "has(self.cache)"),
]

# render._volumes: where each volume is mounted, as CEL (the mount paths are spec fields).
OPERATOR_MOUNT_PATHS_CEL = (
    f"(['{SHM_PATH}']"
    f" + ({_CHECKPOINT_CLAIM} ? [self.checkpoint.path] : [])"
    f" + ({_MODEL_CLAIM} ? [self.model.mountPath] : [])"
    " + (has(self.cache) ? [self.cache.path] : []))"
)


def _keys(table: list[Owned], spec: PipelineJobSpec) -> list[str]:
    return [key for owned in table if owned.when(spec) for key in owned.keys]


def operator_env(spec: PipelineJobSpec) -> list[str]:
    return _keys(OPERATOR_ENV, spec)


def operator_volumes(spec: PipelineJobSpec) -> list[str]:
    return _keys(OPERATOR_VOLUMES, spec)


def operator_mounts(spec: PipelineJobSpec) -> dict[str, str]:
    """Mount path -> the operator's volume mounted there."""
    mounts = {SHM_PATH: "dshm"}
    if _has_checkpoint_claim(spec):
        assert spec.checkpoint is not None
        mounts[spec.checkpoint.path] = "checkpoint"
    if _has_model_claim(spec):
        assert spec.model is not None
        mounts[spec.model.mount_path] = "model"
    if spec.cache is not None:
        mounts[spec.cache.path] = "compile-cache"
    return mounts


def cel_keys(table: list[Owned]) -> str:
    """The keys of ``table`` as one CEL list expression on the spec."""
    parts = [
        repr(list(owned.keys)) if owned.cel == "true" else f"({owned.cel} ? {list(owned.keys)!r} : [])"
        for owned in table
    ]
    return f"({' + '.join(parts)})"


def list_clashes(
    field: str, items: list[dict[str, Any]], key: str, own: dict[str, str], fix: str
) -> list[str]:
    """One message per item of ``spec.template.<field>`` without its ``key``, or whose ``key`` is the
    operator's (``own``: key -> what it is) or an earlier item's."""
    out, seen = [], set()
    for i, item in enumerate(items):
        value = item.get(key)
        where = f"spec.template.{field}[{i}].{key}"
        if not isinstance(value, str):
            out.append(f"{where}: missing or not a string: add it")
            continue
        if value in own:
            out.append(f"{where}: {value!r} is {own[value]}: {fix}")
        elif value in seen:
            out.append(f"{where}: {value!r} is set twice in spec.template.{field}: keep one")
        seen.add(value)
    return out


ENV_FIX = 'remove it (docs/design.md, "Worker environment")'
VOLUME_FIX = "rename it, and its volumeMounts"
MOUNT_FIX = "choose another mountPath"


def clashes(
    spec: PipelineJobSpec,
    env: list[str] | None = None,
    volumes: list[str] | None = None,
    mounts: dict[str, str] | None = None,
) -> list[str]:
    """Every template item whose key the server-side apply would see twice, or lacks; empty when there is
    none. The operator's keys are the tables' for ``spec``, unless given (the operator's rendering)."""
    env = operator_env(spec) if env is None else env
    volumes = operator_volumes(spec) if volumes is None else volumes
    mounts = operator_mounts(spec) if mounts is None else mounts
    t = spec.template
    return (
        list_clashes("env", t.env, "name", dict.fromkeys(env, "set by the operator"), ENV_FIX)
        + list_clashes(
            "volumes",
            t.volumes,
            "name",
            dict.fromkeys(volumes, "the name of the operator's own volume"),
            VOLUME_FIX,
        )
        + list_clashes(
            "volumeMounts",
            t.volume_mounts,
            "mountPath",
            {path: f"where the operator mounts its volume {name!r}" for path, name in mounts.items()},
            MOUNT_FIX,
        )
        + list_clashes("imagePullSecrets", t.image_pull_secrets, "name", {}, "")
    )
