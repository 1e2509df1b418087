"""The CRD's admission rules: CEL (``x-kubernetes-validations`` on the spec) that the API server checks
before any object exists, so that ``kubectl apply`` of a bad PipelineJob fails with the field and the fix.
They mirror the model validators of ``conveyor.spec``, which check the same for ``conveyor run`` and the
operator; ``conveyor crd`` writes them into ``crds/``.
"""

from __future__ import annotations

from pydantic.alias_generators import to_camel

from conveyor import template_keys
from conveyor.spec import GPU_RESOURCE
from conveyor.train_spec import FINE_TUNING_FIELDS, OptimizerSpec, TrainSpec

# The paths the operator mounts volumes at in the worker container (see _mounts_apart), as a CEL list.
_MOUNT_PATHS = template_keys.OPERATOR_MOUNT_PATHS_CEL
_ENV = template_keys.cel_keys(template_keys.OPERATOR_ENV)
_VOLUMES = template_keys.cel_keys(template_keys.OPERATOR_VOLUMES)

# PipelineJobSpec.gpus_per_pod, as CEL (the API server has filled device's and tensorParallel's defaults in).
_GPUS_PER_POD = (
    "(has(self.resources.gpus) ? self.resources.gpus"
    " : (self.device == 'cpu' ? 0 : self.parallelism.tensorParallel))"
)


def _train_field_at_default(name: str) -> str:
    """CEL: spec.train.<name> is absent or its default (as TrainSpec.check_in_job compares it)."""
    field = f"self.train.{to_camel(name)}"
    default = TrainSpec.model_fields[name].get_default(call_default_factory=True)
    if default is None:
        return f"!has({field})"
    if isinstance(default, OptimizerSpec):  # its params are free-form, out of CEL's reach: the type only
        return f"(!has({field}) || {field}.type == '{default.type}')"
    value = str(default).lower() if isinstance(default, bool) else repr(default)
    return f"(!has({field}) || {field} == {value})"


# CEL rules checked by the API server at admission (x-kubernetes-validations on the spec). They mirror
# the model validators of conveyor.spec so that `kubectl apply` fails before any object is created.
CEL_RULES: list[dict[str, str]] = [
    {
        "rule": "self.mode != 'inference' || has(self.inference)",
        "message": "spec.inference is required when spec.mode is 'inference'",
    },
    {
        "rule": "self.mode != 'serve' || has(self.serve)",
        "message": "spec.serve is required when spec.mode is 'serve'",
    },
    {
        "rule": "self.mode != 'train' || has(self.train)",
        "message": "spec.train is required when spec.mode is 'train'",
    },
    {
        "rule": "self.mode == 'train' || has(self.model)",
        "message": "spec.model is required when spec.mode is 'inference' or 'serve'",
    },
    {
        "rule": "self.mode != 'train' || !has(self.train) || (has(self.train.script) ? 1 : 0)"
        " + (has(self.train.command) ? 1 : 0) + (has(self.train.dataset) ? 1 : 0) == 1",
        "message": "spec.train needs exactly one of script, command or dataset",
    },
    {
        "rule": "self.mode != 'train' || !has(self.model) || !has(self.model.kvCacheDtype)"
        " || self.model.kvCacheDtype == 'auto'",
        "message": "spec.model.kvCacheDtype only applies to inference and serve: remove it",
    },
    {
        "rule": "self.mode != 'train' || !has(self.train) || !has(self.train.dataset) || has(self.model)",
        "message": "spec.model is required with spec.train.dataset (the HF model to fine-tune)",
    },
    {
        "rule": "self.mode != 'train' || !has(self.train) || !has(self.train.dataset) || has(self.train.steps)",
        "message": "spec.train.steps is required with spec.train.dataset: add steps (optimizer steps)",
    },
    {
        "rule": "self.mode != 'train' || !has(self.train) || !has(self.train.dataset)"
        " || !has(self.train.globalBatchSize) || self.parallelism.replicas == 0"
        " || self.train.globalBatchSize % (self.train.microBatchSize * self.parallelism.replicas) == 0",
        "message": "spec.train.globalBatchSize must be a multiple of spec.train.microBatchSize x "
        "spec.parallelism.replicas: use such a multiple",
    },
    {
        "rule": "self.mode != 'train' || !has(self.train) || has(self.train.dataset) || ("
        + " && ".join(_train_field_at_default(name) for name in FINE_TUNING_FIELDS)
        + ")",
        "message": "spec.train: "
        + ", ".join(to_camel(name) for name in FINE_TUNING_FIELDS)
        + " only apply to spec.train.dataset (fine-tuning): remove them from a script or command job",
    },
    {
        "rule": "self.mode != 'train' || !has(self.train) || !has(self.train.dataset) || !has(self.train.args)"
        " || size(self.train.args) == 0",
        "message": "spec.train.args only applies to a script or command: remove it",
    },
    {
        "rule": "self.mode != 'train' || (has(self.checkpoint) && has(self.checkpoint.volume)"
        " && self.checkpoint.volume != '')",
        "message": "a train job needs spec.checkpoint.volume (a PersistentVolumeClaim) to resume after restarts",
    },
    {
        "rule": "(self.mode == 'inference') == has(self.inference) && (self.mode == 'serve') == has(self.serve)"
        " && (self.mode == 'train') == has(self.train)",
        "message": "only the section of spec.mode may be set (inference, serve or train)",
    },
    {
        "rule": "self.mode == 'serve' || !has(self.parallelism) || !has(self.parallelism.replicas)"
        " || self.parallelism.replicas >= 1",
        "message": "spec.parallelism.replicas is 0: only serve jobs scale to zero",
    },
    {
        "rule": "!has(self.resources) || !has(self.resources.gpus) || self.resources.gpus == 0"
        " || !has(self.parallelism) || !has(self.parallelism.tensorParallel)"
        " || self.resources.gpus >= self.parallelism.tensorParallel",
        "message": "spec.resources.gpus is below spec.parallelism.tensorParallel: each tensor-parallel rank needs "
        "its own GPU (set gpus >= tensorParallel, or 0 for the CPU)",
    },
    {
        "rule": "!has(self.restartPolicy) || !has(self.restartPolicy.maxBackoffSeconds)"
        " || !has(self.restartPolicy.backoffSeconds)"
        " || self.restartPolicy.maxBackoffSeconds >= self.restartPolicy.backoffSeconds",
        "message": "spec.restartPolicy.maxBackoffSeconds must be >= backoffSeconds",
    },
    {
        "rule": "!has(self.placement) || !has(self.placement.exclusive) || !self.placement.exclusive"
        " || has(self.placement.topologyKey)",
        "message": "spec.placement.exclusive needs spec.placement.topologyKey (the node label of the domain)",
    },
    # The ports of one pod apart (see _ports_apart); the API server has filled their defaults in by now.
    {
        "rule": "self.metricsPort + self.parallelism.tensorParallel <= 65536",
        "message": "spec.metricsPort + spec.parallelism.tensorParallel - 1 is above 65535: each tensor-parallel "
        "rank serves its metrics on metricsPort + its local rank; lower metricsPort",
    },
    {
        "rule": "self.masterPort < self.metricsPort"
        " || self.masterPort >= self.metricsPort + self.parallelism.tensorParallel",
        "message": "spec.masterPort is one of the metrics ports (metricsPort to metricsPort + tensorParallel - 1, "
        "one per tensor-parallel rank): change masterPort or metricsPort",
    },
    {
        "rule": "!has(self.serve) || (self.serve.port != self.masterPort && (self.serve.port < self.metricsPort"
        " || self.serve.port >= self.metricsPort + self.parallelism.tensorParallel))",
        "message": "spec.serve.port is spec.masterPort or one of the metrics ports (metricsPort to metricsPort "
        "+ tensorParallel - 1): choose another serve.port",
    },
    {
        "rule": f"{_MOUNT_PATHS}.all(p, {_MOUNT_PATHS}.filter(q, q == p).size() == 1)",
        "message": "spec.checkpoint.path, spec.model.mountPath, spec.cache.path and /dev/shm (the mount paths "
        "of the checkpoint claim, the model claim, the compile cache and shared memory) must differ: change "
        "one of them",
    },
    {
        "rule": f"!has(self.resources.requests) || !('{GPU_RESOURCE}' in self.resources.requests)"
        f" || self.resources.requests['{GPU_RESOURCE}'] == ({_GPUS_PER_POD} > 0 ? string({_GPUS_PER_POD})"
        f" : (has(self.resources.limits) && '{GPU_RESOURCE}' in self.resources.limits"
        f" ? self.resources.limits['{GPU_RESOURCE}'] : ''))",
        "message": f"spec.resources.requests['{GPU_RESOURCE}'] is not the pod's GPU limit, and Kubernetes wants them "
        f"equal: set spec.resources.gpus and remove {GPU_RESOURCE} from spec.resources.requests",
    },
    {
        "rule": "!has(self.resources.requests) || !has(self.resources.limits) || self.resources.requests.all(k,"
        f" k == '{GPU_RESOURCE}' || !(k in self.resources.limits)"
        " || !quantity(self.resources.requests[k]).isGreaterThan(quantity(self.resources.limits[k])))",
        "message": "spec.resources.requests has a value above its spec.resources.limits, and Kubernetes wants a "
        "request at most its limit: lower the request or raise the limit",
    },
    # spec.template's items beside the operator's own (template_keys.py; a key twice in the template is
    # refused by the lists' list-map keys). A messageExpression naming the items costs more than the API
    # server's budget allows.
    {
        "rule": f"!has(self.template.env) || self.template.env.all(e, !(e.name in {_ENV}))",
        "message": "spec.template.env sets a variable the operator sets itself (CONVEYOR_JOB and the other "
        "CONVEYOR_* it renders, MASTER_ADDR, MASTER_PORT; WORLD_SIZE, LOCAL_WORLD_SIZE, NODE_RANK in a train "
        'job): remove it (docs/design.md, "Worker environment")',
    },
    {
        "rule": f"!has(self.template.volumes) || self.template.volumes.all(v, !(v.name in {_VOLUMES}))",
        "message": "spec.template.volumes names a volume the operator adds itself (dshm, checkpoint, model or "
        "compile-cache): rename it, and its volumeMounts",
    },
    {
        "rule": "!has(self.template.volumeMounts)"
        f" || self.template.volumeMounts.all(m, !(m.mountPath in {_MOUNT_PATHS}))",
        "message": "spec.template.volumeMounts mounts at a path where the operator mounts a volume of its own "
        "(spec.checkpoint.path, spec.model.mountPath, spec.cache.path or /dev/shm): choose another mountPath",
    },
    {"rule": "self.mode == oldSelf.mode", "message": "spec.mode is immutable: create a new PipelineJob"},
]

# Layout fields may not change while pods run: the stages' weights and ranks would not match. They are
# rules on `spec` (transition rules: `oldSelf` is the stored spec) so that a suspended job may change its
# layout: checkpoints are keyed by layer index, so it resumes with the new stages or tensorParallel.
IMMUTABLE_PARALLELISM_RULES: list[dict[str, str]] = [
    {
        "rule": "(has(oldSelf.suspend) && oldSelf.suspend && has(self.suspend) && self.suspend)"
        " || self.parallelism.stages == oldSelf.parallelism.stages",
        "message": "spec.parallelism.stages cannot change while the job runs: set suspend: true first "
        "(it resumes from the checkpoint with the new layout) or create a new job",
    },
    {
        "rule": "(has(oldSelf.suspend) && oldSelf.suspend && has(self.suspend) && self.suspend)"
        " || self.parallelism.tensorParallel == oldSelf.parallelism.tensorParallel",
        "message": "spec.parallelism.tensorParallel cannot change while the job runs: set suspend: true first "
        "(it resumes from the checkpoint with the new layout) or create a new job",
    },
]
