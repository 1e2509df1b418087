"""The PipelineJob API (``conveyor.dev/v1alpha1``): the one contract shared by the operator, the worker
and ``conveyor run``.

The CRD in ``crds/`` is generated from these models (``conveyor crd``), so a field, its bounds, its
default and its description are written once, here. Field names are camelCase on the wire (Kubernetes
style) and snake_case in Python. Unknown fields are refused everywhere, never silently dropped.

Cross-field rules live in ``model_validator``s below and, as CEL, in ``admission_rules.py`` (the API
server checks those at admission, before any pod exists); both name the field and the fix. The status
the operator writes is ``job_status.py``. Sections with rules of their own have their own modules:
``train_spec.py`` (spec.train), ``placement.py``, ``failure_policy.py``; ``spec_errors.py`` words a
validation error for the user.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from conveyor.failure_policy import FailurePolicySpec
from conveyor.kube_formats import (
    MAX_SECONDS,
    KubeObject,
    LabelValue,
    MountObject,
    NamedObject,
    ObjectName,
    Quantity,
    check_keys,
    list_map,
)
from conveyor.placement import PlacementSpec
from conveyor.spec_errors import SpecError, format_validation_error
from conveyor.spec_model import SpecModel
from conveyor.template_keys import SHM_PATH, clashes
from conveyor.train_spec import TrainSpec

GROUP = "conveyor.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "PipelineJob"
PLURAL = "pipelinejobs"
SHORT_NAMES = ["plj"]
DEFAULT_IMAGE = "ghcr.io/conveyor-dev/conveyor-worker:0.1.0"

# The extended resource the operator asks for spec.resources.gpus with (gpus_per_pod).
GPU_RESOURCE = "nvidia.com/gpu"


class Mode(StrEnum):
    INFERENCE = "inference"
    SERVE = "serve"
    TRAIN = "train"


class ModelSpec(SpecModel):
    """Where the model's weights are and how to load them."""

    path: str = Field(
        min_length=1,
        description="Directory of a HuggingFace checkpoint (config.json + safetensors), as the worker sees it.",
    )
    format: Literal["hf"] = Field("hf", description="Checkpoint format; only HuggingFace (`hf`) today.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Compute dtype of weights and activations."
    )
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        "auto",
        description="KV cache storage of inference and serve: `auto` is `dtype`; `fp8` (float8 e4m3, on "
        "GPUs of compute capability 8.9+: Ada, Hopper and newer) halves the cache's memory (twice the "
        "lanes or context), at a slower decode step today, and rounds keys and values to 3 mantissa "
        "bits: tokens may differ.",
    )
    volume: str | None = Field(
        None,
        description="PersistentVolumeClaim holding the model, mounted read-only at `mountPath` (optional: "
        "the model may also come through template.volumes).",
    )
    mount_path: str = Field("/models", min_length=1, description="Where `volume` is mounted in the worker.")


class ParallelismSpec(SpecModel):
    """The layout: replicas x stages x tensorParallel ranks (see docs/design.md)."""

    stages: int = Field(1, ge=1, le=64, description="Pipeline stages (P): one pod per stage.")
    tensor_parallel: int = Field(
        1, ge=1, le=16, description="Tensor-parallel ranks inside a stage (T): GPUs and processes per pod."
    )
    replicas: int = Field(
        1,
        ge=0,
        le=1024,
        description="Data-parallel replicas (R): independent groups for inference and serve.",
    )
    micro_batches: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Micro-batches in flight through the pipeline; default: as many as stages.",
    )
    partition_method: str = Field(
        "parameters",
        pattern=r"^(parameters|uniform|type:.+)$",
        description="How layers are split over stages: `parameters`, `uniform` or `type:REGEX`.",
    )

    @field_validator("partition_method")
    @classmethod
    def _type_regex_compiles(cls, method: str) -> str:
        # A bad REGEX otherwise surfaced as re.error from deep inside every rank's model build.
        if method.startswith("type:"):
            try:
                re.compile(method[5:], re.IGNORECASE)
            except re.error as err:
                raise ValueError(
                    f"{method!r}: REGEX after `type:` is not a regular expression ({err}): fix it, e.g. "
                    "`type:DecoderLayer`"
                ) from None
        return method

    @property
    def group_size(self) -> int:
        return self.stages * self.tensor_parallel

    @property
    def effective_micro_batches(self) -> int:
        return self.micro_batches or self.stages


class ResourcesSpec(SpecModel):
    gpus: int | None = Field(
        None, ge=0, le=16, description="GPUs per pod; default: tensorParallel. 0 runs on the CPU."
    )
    # At most 64 of each: a bound for the API server's cost estimate of the requests-within-limits rule.
    requests: dict[str, Quantity] = Field(
        default_factory=dict, max_length=64, description="Extra container resource requests."
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict, max_length=64, description="Extra container resource limits."
    )

    @field_validator("requests", "limits")
    @classmethod
    def _resource_names(cls, quantities: dict[str, str]) -> dict[str, str]:
        check_keys(quantities, "a resource name (e.g. `cpu`, `memory`, `nvidia.com/gpu`)")
        return quantities

    @model_validator(mode="after")
    def _requests_within_limits(self) -> ResourcesSpec:
        # Kubernetes refuses a container whose request is above its limit: every apply of the job's
        # StatefulSets would fail. (The GPU limit is the operator's: _gpu_request_is_the_limit checks it.)
        for name, request in self.requests.items():
            limit = self.limits.get(name)
            if name == GPU_RESOURCE or limit is None:
                continue
            from kubernetes.utils.quantity import parse_quantity  # the API client's parser (a slow import)

            if parse_quantity(request) > parse_quantity(limit):
                raise ValueError(
                    f"spec.resources.requests['{name}'] ({request}) is above spec.resources.limits['{name}'] "
                    f"({limit}), and Kubernetes wants a request at most its limit: lower the request or raise "
                    "the limit"
                )
        return self


class TemplateSpec(SpecModel):
    """Pod-level overrides, passed through to every worker pod."""

    node_selector: dict[str, LabelValue] = Field(default_factory=dict)
    tolerations: list[KubeObject] = Field(default_factory=list)
    affinity: KubeObject | None = None
    priority_class_name: ObjectName | None = None
    scheduler_name: str | None = None
    service_account_name: ObjectName | None = None
    # Keyed as in a pod (see template_keys.py): the operator appends these to its own items.
    env: list[NamedObject] = list_map("name", 1024)
    volumes: list[NamedObject] = list_map("name", 256)
    volume_mounts: list[MountObject] = list_map("mountPath", 256)
    image_pull_secrets: list[NamedObject] = list_map("name", 256)
    labels: dict[str, LabelValue] = Field(default_factory=dict, description="Extra labels on worker pods.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra annotations on worker pods.")

    @field_validator("node_selector", "labels")
    @classmethod
    def _label_keys(cls, labels: dict[str, str]) -> dict[str, str]:
        check_keys(labels, "a label key")
        return labels

    @field_validator("annotations")
    @classmethod
    def _annotation_keys(cls, annotations: dict[str, str]) -> dict[str, str]:
        check_keys(annotations, "an annotation key")
        return annotations

    @field_validator("labels", "annotations")
    @classmethod
    def _not_the_operators(cls, keys: dict[str, str]) -> dict[str, str]:
        # The operator's own keys steer it: conveyor.dev/serving puts a pod behind the serve Service,
        # conveyor.dev/restart and template-hash decide which pods are current. A template's value would
        # reach every new pod before the operator's own (a pod serving before it is ready).
        for key in keys:
            if key.startswith(f"{GROUP}/"):
                raise ValueError(
                    f"{key!r}: keys under {GROUP}/ are the operator's own: remove it, or rename it"
                )
        return keys


class CheckpointSpec(SpecModel):
    volume: str | None = Field(
        None, description="PersistentVolumeClaim shared by all ranks for checkpoints and inference progress."
    )
    path: str = Field("/checkpoints", min_length=1, description="Checkpoint directory inside the worker.")
    every: int = Field(
        100, ge=1, description="Steps (train) or completed prompts (inference) between commits."
    )
    keep: int = Field(3, ge=1, le=100, description="Committed checkpoints kept; older ones are deleted.")
    stale_after_seconds: int | None = Field(
        None,
        ge=60,
        le=MAX_SECONDS,
        description="A running train job whose last committed checkpoint is older is CheckpointStale; none: 3 x "
        "the observed time between checkpoints.",
    )


class CacheSpec(SpecModel):
    """The compile cache (inductor's and Triton's kernels, the matmul tile choices): what warm-up makes,
    kept so that a restarted group, another replica or the next job starts warm."""

    volume: str | None = Field(
        None,
        description="PersistentVolumeClaim shared by the job's replicas (ReadWriteMany); none: an emptyDir per pod.",
    )
    path: str = Field("/var/cache/conveyor", min_length=1, description="Cache directory inside the worker.")


class RestartPolicySpec(SpecModel):
    backoff_limit: int = Field(3, ge=0, le=1000, description="Group restarts before the job is Failed.")
    backoff_seconds: int = Field(
        10, ge=0, le=MAX_SECONDS, description="Delay before the first restart; doubles each time."
    )
    max_backoff_seconds: int = Field(
        300, ge=0, le=MAX_SECONDS, description="Upper bound of the restart delay."
    )
    startup_timeout_seconds: int = Field(
        1800,
        ge=10,
        le=MAX_SECONDS,
        description="A group not ready within this long after (re)start is restarted.",
    )

    @model_validator(mode="after")
    def _bounds_ordered(self) -> RestartPolicySpec:
        if self.max_backoff_seconds < self.backoff_seconds:
            raise ValueError(
                f"maxBackoffSeconds ({self.max_backoff_seconds}) is below backoffSeconds ({self.backoff_seconds}): "
                "raise maxBackoffSeconds or lower backoffSeconds"
            )
        return self


class SamplingSpec(SpecModel):
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 means greedy.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 turns it off.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 turns it off.")
    repetition_penalty: float = Field(1.0, gt=0.0, description="HF-style penalty on seen tokens; 1 is none.")
    seed: int = Field(0, ge=0, description="Seed of the sampler; the same tokens for any layout.")
    stop_token_ids: list[int] = Field(default_factory=list, description="Token ids that end a sequence.")
    stop: list[str] = Field(default_factory=list, description="Strings that end a sequence.")


class InferenceSpec(SpecModel):
    input: str = Field(
        min_length=1,
        description="JSONL of prompts: {id, prompt} or {id, input_ids}, each optionally with its own "
        "max_new_tokens.",
    )
    output: str = Field(min_length=1, description="JSONL of results: {id, output_ids, text, finish_reason}.")
    max_new_tokens: int = Field(
        128,
        ge=1,
        le=1_000_000,
        description="New tokens per prompt where its row gives none; the most a row's own may ask.",
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Sequences decoded together per replica.")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    quantization: Literal["none", "int8"] = Field(
        "none", description="`int8`: weight-only int8 block linears (per-channel scales); head stays full."
    )


class RolloutSpec(SpecModel):
    """How a serve job's replicas roll to a new spec, group by group (LeaderWorkerSet's rolling update)."""

    max_surge: int = Field(
        1,
        ge=0,
        # Surge replicas are NAME-r{replicas..}: with replicas <= 1024 they stay within r2047, well inside the
        # four digits MAX_NAME_LENGTH allows for (past r9999 the pods' revision label outgrows 63 characters).
        le=1024,
        description="Extra replicas started with the new spec during a rollout, when the cluster has room "
        "(else the rollout goes in place); at most spec.parallelism.replicas of them.",
    )
    max_unavailable: int = Field(
        0,
        ge=0,
        le=1024,
        description="Replicas that may be out of service at once during a rollout (in place: at least 1).",
    )
    drain_seconds: int = Field(
        5,
        ge=0,
        le=3600,
        description="Seconds between taking a replica out of the Service and stopping it (for the endpoints "
        "to drop it); its in-flight requests then finish within the termination grace period.",
    )


class ServeSpec(SpecModel):
    port: int = Field(8000, ge=1, le=65535, description="Port of the OpenAI-compatible endpoint.")
    max_batch_size: int = Field(64, ge=1, le=4096, description="Sequences decoded together.")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)


class PipelineJobSpec(SpecModel):
    mode: Mode = Field(description="What the job does: batch `inference`, `serve` an endpoint, or `train`.")
    model: ModelSpec | None = Field(None, description="Required for inference and serve.")
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec)
    image: str = Field(
        DEFAULT_IMAGE,
        min_length=1,
        json_schema_extra={"pattern": r"^\S(.*\S)?$"},
        description="Worker image (runs `conveyor worker`).",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="`auto`: CUDA when GPUs are given.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    template: TemplateSpec = Field(default_factory=TemplateSpec)
    checkpoint: CheckpointSpec | None = None
    cache: CacheSpec | None = Field(
        None, description="The compile cache volume; none: the worker's own disk."
    )
    restart_policy: RestartPolicySpec = Field(default_factory=RestartPolicySpec)
    failure_policy: FailurePolicySpec = Field(
        default_factory=FailurePolicySpec, description="Which failures restart, fail or are ignored."
    )
    placement: PlacementSpec = Field(
        default_factory=PlacementSpec,
        description="Where a group's pods land: one topology domain, one group per domain, Kueue queue.",
    )
    suspend: bool = Field(False, description="Stop the pods and keep state; resuming continues (Kueue).")
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        le=MAX_SECONDS,
        description="Delete the job's pods and Service this long after it finished.",
    )
    master_port: int = Field(29500, ge=1024, le=65535, description="Rendezvous port (torch.distributed).")
    metrics_port: int = Field(9400, ge=1024, le=65535, description="Worker Prometheus port.")
    inference: InferenceSpec | None = None
    train: TrainSpec | None = None
    serve: ServeSpec | None = None

    @field_validator("image")
    @classmethod
    def _image_trimmed(cls, image: str) -> str:
        # The API server refuses such a container image, and with it every apply of the StatefulSets.
        if image != image.strip():
            raise ValueError(
                f"{image!r} has leading or trailing whitespace, which Kubernetes refuses: remove it"
            )
        return image

    @model_validator(mode="after")
    def _mode_sections(self) -> PipelineJobSpec:
        needed = {Mode.INFERENCE: "inference", Mode.SERVE: "serve", Mode.TRAIN: "train"}[Mode(self.mode)]
        if getattr(self, needed) is None:
            raise ValueError(
                f"spec.{needed} is required when spec.mode is {self.mode!r}: add a `{needed}:` section"
            )
        for other in {"inference", "serve", "train"} - {needed}:
            if getattr(self, other) is not None:
                raise ValueError(
                    f"spec.{other} is set but spec.mode is {self.mode!r}: remove spec.{other} or set mode: {other}"
                )
        if self.mode in (Mode.INFERENCE, Mode.SERVE) and self.model is None:
            raise ValueError(f"spec.model is required when spec.mode is {self.mode!r}: add model.path")
        if self.mode == Mode.TRAIN:
            assert self.train is not None
            self.train.check_in_job(has_model=self.model is not None, replicas=self.parallelism.replicas)
            if self.model is not None and self.model.kv_cache_dtype != "auto":
                raise ValueError(
                    "spec.model.kvCacheDtype only applies to inference and serve (training keeps no KV "
                    "cache): remove it"
                )
            if self.checkpoint is None:
                raise ValueError("spec.checkpoint is required when spec.mode is 'train': add checkpoint.path")
        gpus = self.resources.gpus
        if gpus is not None and 0 < gpus < self.parallelism.tensor_parallel:
            raise ValueError(
                f"spec.resources.gpus ({gpus}) is below spec.parallelism.tensorParallel "
                f"({self.parallelism.tensor_parallel}): each tensor-parallel rank needs its own GPU; "
                "set gpus >= tensorParallel, or 0 to run on the CPU"
            )
        if self.mode != Mode.SERVE and self.parallelism.replicas == 0:
            raise ValueError(
                "spec.parallelism.replicas is 0: only serve jobs scale to zero; use replicas >= 1"
            )
        return self

    @model_validator(mode="after")
    def _ports_apart(self) -> PipelineJobSpec:
        # Each of a pod's T rank processes serves its metrics on metricsPort + its local rank; rank 0's
        # TCPStore listens on masterPort and a serve replica's entry rank on serve.port, all in one pod.
        # Overlapping ports fail at bind, and equal container ports make the server-side apply of the
        # StatefulSet (and of the Service) fail, so the job would never start.
        tp = self.parallelism.tensor_parallel
        first, last = self.metrics_port, self.metrics_port + tp - 1
        metrics = f"the metrics ports {first}-{last} (metricsPort + local rank, one per tensor-parallel rank)"
        if last > 65535:
            raise ValueError(
                f"spec.metricsPort ({first}) + tensorParallel ({tp}) - 1 is above 65535: each tensor-parallel "
                f"rank serves its metrics on metricsPort + its local rank; set metricsPort <= {65536 - tp}"
            )
        if first <= self.master_port <= last:
            raise ValueError(
                f"spec.masterPort ({self.master_port}) is one of {metrics}: change masterPort or metricsPort"
            )
        if self.serve is not None:
            port = self.serve.port
            if port == self.master_port or first <= port <= last:
                taken = "spec.masterPort" if port == self.master_port else metrics
                raise ValueError(f"spec.serve.port ({port}) is {taken}: choose another serve.port")
        return self

    @model_validator(mode="after")
    def _gpu_request_is_the_limit(self) -> PipelineJobSpec:
        # An extended resource's request must equal its limit, and the operator writes the nvidia.com/gpu
        # limit from gpus_per_pod (the user's own limit stays only when that is 0). Any other request made
        # every apply of the StatefulSets fail. (A user's limit of another count is replaced, not refused:
        # such a job runs, with gpus_per_pod GPUs.)
        request = self.resources.requests.get(GPU_RESOURCE)
        limit = str(self.gpus_per_pod) if self.gpus_per_pod > 0 else self.resources.limits.get(GPU_RESOURCE)
        if request is not None and request != limit:
            raise ValueError(
                f"spec.resources.requests['{GPU_RESOURCE}'] ({request}) is not the pod's GPU limit "
                f"({limit or 'none'}: spec.resources.gpus, default tensorParallel, 0 on the CPU), and Kubernetes "
                f"wants them equal: set spec.resources.gpus and remove {GPU_RESOURCE} from spec.resources.requests"
            )
        return self

    @model_validator(mode="after")
    def _mounts_apart(self) -> PipelineJobSpec:
        # The operator mounts each of these in the worker container (render._volumes); two at one path
        # make the server-side apply of the StatefulSet fail, so the job would never start.
        mounts = [(SHM_PATH, "the shared memory volume")]
        if self.checkpoint is not None and self.checkpoint.volume:
            mounts.append((self.checkpoint.path, "spec.checkpoint.path"))
        if self.model is not None and self.model.volume:
            mounts.append((self.model.mount_path, "spec.model.mountPath"))
        if self.cache is not None:
            mounts.append((self.cache.path, "spec.cache.path"))
        for i, (path, field) in enumerate(mounts):
            for earlier_path, earlier in mounts[:i]:
                if path == earlier_path:
                    raise ValueError(
                        f"{field} ({path}) is also {earlier}'s mount path: each volume needs its own, so "
                        f"change {field}"
                    )
        return self

    @model_validator(mode="after")
    def _template_apart_from_the_operator(self) -> PipelineJobSpec:
        # The template's env, volumes and mounts join the operator's own in one list each; a key twice
        # makes every server-side apply of the StatefulSets fail (template_keys.py).
        found = clashes(self)
        if found:
            raise ValueError("\n".join(found))
        return self

    @property
    def gpus_per_pod(self) -> int:
        if self.resources.gpus is not None:
            return self.resources.gpus
        return 0 if self.device == "cpu" else self.parallelism.tensor_parallel


# The longest StatefulSet name is NAME-r1023 and its pods' controller-revision-hash label adds 11
# characters; label values stop at 63, so NAME stops at 46.
MAX_NAME_LENGTH = 46
# NAME is also the headless Service's name, a DNS-1035 label: a letter first and no dots. The API server
# takes any DNS-1123 subdomain as a PipelineJob's name (`1llm`, `my.llm`), whose Service it then refuses.
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


class ObjectMeta(SpecModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)
    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _service_name(cls, name: str) -> str:
        if not re.match(NAME_PATTERN, name):
            raise ValueError(
                f"{name!r} is not a DNS-1035 label ([a-z]([-a-z0-9]*[a-z0-9])?): the job's Service takes its "
                "name, so use lower-case letters, digits and '-', starting with a letter"
            )
        return name


class PipelineJob(SpecModel):
    """A whole PipelineJob document, as `kubectl apply` or `conveyor run` reads it."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)
    api_version: Literal["conveyor.dev/v1alpha1"] = "conveyor.dev/v1alpha1"
    kind: Literal["PipelineJob"] = "PipelineJob"
    metadata: ObjectMeta
    spec: PipelineJobSpec


def parse_job(doc: dict[str, Any]) -> PipelineJob:
    """Validate a PipelineJob document; raises SpecError with every problem, each naming its field."""
    try:
        return PipelineJob.model_validate(doc)
    except ValidationError as err:
        raise SpecError(format_validation_error(err)) from None


def parse_spec(spec: dict[str, Any]) -> PipelineJobSpec:
    try:
        return PipelineJobSpec.model_validate(spec)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, prefix="spec")) from None


class _JobLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as kubectl does (YAML 1.2's floats): PyYAML's YAML 1.1
    needs a dot, so ``lr: 1e-5`` came back the string "1e-5" locally and a float from the cluster, and
    the optimizer then failed comparing it."""


_JobLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)$"),
    list("-+.0123456789"),
)


def load_job(path: str | Path) -> PipelineJob:
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"{path}: byte {err.start + 1} is not UTF-8: save the file as UTF-8") from None
    try:
        docs = [d for d in yaml.load_all(text, Loader=_JobLoader) if d is not None]
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if len(jobs) != 1:
        raise SpecError(f"{path}: expected exactly one document of kind {KIND}, found {len(jobs)}")
    return parse_job(jobs[0])


def spec_to_json(spec: PipelineJobSpec) -> str:
    """The wire form carried in CONVEYOR_SPEC: camelCase, only the values that differ from their defaults
    (``parse_spec`` of it gives back an equal spec; the worker fills the defaults).

    The operator renders this into every pod template, so it must not change when a release adds a field
    with a default: dumping every field would roll every running job on an operator upgrade, and would
    hand an older worker image a field it refuses. A value set equal to its default is left out too (the
    API server's schema defaulting writes defaults into stored objects, so "set" and "defaulted" cannot
    be told apart anyway). docs/operator.md, "Upgrading the operator"."""
    return spec.model_dump_json(by_alias=True, exclude_defaults=True)
