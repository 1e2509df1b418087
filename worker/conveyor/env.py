"""The worker environment contract (docs/design.md, "Worker environment").

The operator (in a pod) and ``conveyor run`` (on one machine) set the same ``CONVEYOR_*`` variables
for each pod; ``PodEnv.from_environ`` reads them once at the entry point, and ``rank_environ`` derives
the torch.distributed variables of each of the pod's T local processes. Nothing below the entry points
reads ``os.environ``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from conveyor.paths import DEFAULT_COMPILE_CACHE, compile_cache_dir  # noqa: F401 (re-exported)
from conveyor.spec import Mode, PipelineJobSpec, SpecError, parse_spec


class EnvError(RuntimeError):
    """A missing or inconsistent worker environment variable; the message names it."""


def _int(environ: Mapping[str, str], name: str, default: int | None = None, minimum: int = 0) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise EnvError(f"{name} is not set: the operator or `conveyor run` sets it for every worker pod")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise EnvError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise EnvError(f"{name}={value} must be >= {minimum}")
    return value


@dataclass(frozen=True)
class PodEnv:
    """What one pod (one replica x stage) knows about itself."""

    job: str
    mode: Mode
    stages: int
    tensor_parallel: int
    replicas: int
    replica: int
    stage: int
    master_addr: str
    master_port: int
    restart: int
    checkpoint_dir: str | None
    spec: PipelineJobSpec
    template_hash: str | None = None  # the operator's hash of the pod template (CONVEYOR_TEMPLATE_HASH)
    # the persistent compile cache (CONVEYOR_COMPILE_CACHE: spec.cache's mount); None: ~/.cache/conveyor
    compile_cache: str | None = None

    @property
    def compile_cache_dir(self) -> Path:
        return Path(self.compile_cache) if self.compile_cache else DEFAULT_COMPILE_CACHE

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> PodEnv:
        env = os.environ if environ is None else environ
        raw_spec = env.get("CONVEYOR_SPEC")
        if not raw_spec:
            raise EnvError("CONVEYOR_SPEC is not set: it carries the job's spec as JSON")
        import json

        try:
            spec = parse_spec(json.loads(raw_spec))
        except json.JSONDecodeError as err:
            raise EnvError(f"CONVEYOR_SPEC is not valid JSON: {err}") from None
        except SpecError as err:
            raise EnvError(f"CONVEYOR_SPEC does not validate:\n{err}") from None

        mode = Mode(env.get("CONVEYOR_MODE", spec.mode))
        if mode != spec.mode:
            raise EnvError(f"CONVEYOR_MODE={mode.value} disagrees with CONVEYOR_SPEC's mode {spec.mode}")
        stages = _int(env, "CONVEYOR_STAGES", spec.parallelism.stages, minimum=1)
        tp = _int(env, "CONVEYOR_TENSOR_PARALLEL", spec.parallelism.tensor_parallel, minimum=1)
        replicas = _int(env, "CONVEYOR_REPLICAS", spec.parallelism.replicas, minimum=0)
        if (stages, tp) != (spec.parallelism.stages, spec.parallelism.tensor_parallel):
            raise EnvError(
                f"CONVEYOR_STAGES={stages}, CONVEYOR_TENSOR_PARALLEL={tp} disagree with the spec's layout "
                f"({spec.parallelism.stages} x {spec.parallelism.tensor_parallel})"
            )
        pod_index = _int(env, "CONVEYOR_POD_INDEX")
        if mode == Mode.TRAIN:
            # One StatefulSet for the whole job: ordinal = replica * P + stage.
            replica, stage = divmod(pod_index, stages)
        else:
            # One StatefulSet per replica: ordinal = stage.
            replica, stage = _int(env, "CONVEYOR_REPLICA", 0), pod_index
        if stage >= stages or (replicas and replica >= replicas):
            raise EnvError(
                f"CONVEYOR_POD_INDEX={pod_index} (replica {replica}, stage {stage}) is outside the layout "
                f"{replicas} replicas x {stages} stages"
            )
        master_addr = env.get("MASTER_ADDR")
        if not master_addr:
            raise EnvError("MASTER_ADDR is not set: the DNS name (or address) of the group's first pod")
        return cls(
            job=env.get("CONVEYOR_JOB", "job"),
            mode=mode,
            stages=stages,
            tensor_parallel=tp,
            replicas=replicas,
            replica=replica,
            stage=stage,
            master_addr=master_addr,
            master_port=_int(env, "MASTER_PORT", spec.master_port, minimum=1),
            restart=_int(env, "CONVEYOR_RESTART", 0),
            checkpoint_dir=env.get("CONVEYOR_CHECKPOINT_DIR") or None,
            spec=spec,
            template_hash=env.get("CONVEYOR_TEMPLATE_HASH") or None,
            compile_cache=env.get("CONVEYOR_COMPILE_CACHE") or None,
        )

    @property
    def world_size(self) -> int:
        group = self.stages * self.tensor_parallel
        return group * self.replicas if self.mode == Mode.TRAIN else group

    def global_rank(self, local_rank: int) -> int:
        rank = self.stage * self.tensor_parallel + local_rank
        if self.mode == Mode.TRAIN:
            rank += self.replica * self.stages * self.tensor_parallel
        return rank

    def rank_environ(self, local_rank: int) -> dict[str, str]:
        """torch.distributed env:// variables of one local process."""
        return {
            "RANK": str(self.global_rank(local_rank)),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.tensor_parallel),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "CONVEYOR_RENDEZVOUS": self.rendezvous,
        }

    @property
    def rendezvous(self) -> str:
        """This generation of the group: ranks of another restart or pod template never join it
        (distributed.py). Without the operator's template hash (``conveyor run``), the spec's digest."""
        import hashlib

        from conveyor.spec import spec_to_json

        digest = self.template_hash or hashlib.sha256(spec_to_json(self.spec).encode()).hexdigest()[:12]
        return f"restart-{self.restart}-{digest}"


def pod_environ(
    *,
    job: str,
    spec: PipelineJobSpec,
    replica: int,
    stage: int,
    master_addr: str,
    master_port: int,
    restart: int = 0,
    checkpoint_dir: str | None = None,
    compile_cache: str | None = None,
) -> dict[str, str]:
    """The CONVEYOR_* variables of one pod, as the operator sets them (``conveyor run`` uses this too).

    In a pod the operator takes CONVEYOR_POD_INDEX from the downward API instead of a literal.
    """
    from conveyor.spec import spec_to_json

    p = spec.parallelism
    pod_index = replica * p.stages + stage if spec.mode == Mode.TRAIN else stage
    env = {
        "CONVEYOR_JOB": job,
        "CONVEYOR_MODE": str(spec.mode),
        "CONVEYOR_STAGES": str(p.stages),
        "CONVEYOR_TENSOR_PARALLEL": str(p.tensor_parallel),
        "CONVEYOR_REPLICAS": str(p.replicas),
        "CONVEYOR_REPLICA": str(replica),
        "CONVEYOR_POD_INDEX": str(pod_index),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "CONVEYOR_RESTART": str(restart),
        "CONVEYOR_SPEC": spec_to_json(spec),
    }
    if checkpoint_dir:
        env["CONVEYOR_CHECKPOINT_DIR"] = checkpoint_dir
    if compile_cache:
        env["CONVEYOR_COMPILE_CACHE"] = compile_cache
    return env
