"""Fine-tune an HF causal LM from the spec (``spec.train.dataset``): one rank's whole run.

In a straight line: build the pipeline's layers from the model's config (hf_layers.py), make their
linears tensor-parallel when ``tensorParallel`` > 1 (tensor_parallel.py), and fill this stage's (this
tensor rank's part of them) from the checkpoint; the engine with the spec's optimizer, schedule, clipping and precision;
resume from the committed checkpoint (weights, optimizer, schedule, step, data position) if any; then
``steps`` optimizer steps over the data in its deterministic order (data.py), a checkpoint every
``spec.checkpoint.every`` steps and at the end, and the export to a plain HF directory (export.py).
A run that finds its checkpoint at the last step and its export written only reports completion.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from conveyor.inference.model.families import Arch, load_arch
from conveyor.inference.model.loader import Shard
from conveyor.inference.validate import check_seq_length
from conveyor.log import get_logger
from conveyor.pipe.config import ConfigError, EngineConfig, load_config
from conveyor.pipe.engine import PipelineEngine
from conveyor.pipe.module import PipelineModule
from conveyor.pipe.optim import build_optimizer, build_scheduler
from conveyor.spec import PipelineJobSpec
from conveyor.topology import Topology
from conveyor.train.data import DataOrder, read_samples
from conveyor.train.export import check_export_path, export, read_record
from conveyor.train.hf_layers import Role, causal_lm_loss, load_weights, parameter_count, pipeline_layers
from conveyor.train.progress import Progress, flops_per_token, peak_flops
from conveyor.train.run_identity import KEY as RUN_KEY
from conveyor.train.run_identity import check as check_run
from conveyor.train.run_identity import run_identity
from conveyor.train.tensor_parallel import check_tensor_parallel, mark_layouts, parallelize
from conveyor.train.vocab_parallel import vocab_parallel, vocab_parallel_causal_lm_loss
from conveyor.train_spec import TrainSpec

log = get_logger("conveyor.train")
EXPORT_DIR = "export"
# HF config fields of dropout probabilities (GPT-2, OPT, GPT-NeoX, Llama-style): the layers have no dropout
DROPOUT_FIELDS = (
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "hidden_dropout",
)


@dataclass
class Outcome:
    losses: dict[int, float] = field(default_factory=dict)  # step -> mean loss, for the steps this run took
    grad_norms: dict[int, float | None] = field(default_factory=dict)  # step -> the whole gradient's norm
    resumed_from: int = 0  # the step of the checkpoint it resumed from (0: none)
    export: Path | None = None


def uses_bf16(train: TrainSpec, device: torch.device) -> bool:
    return train.precision == "bf16" or (train.precision == "auto" and device.type == "cuda")


def engine_config(train: TrainSpec, replicas: int, bf16: bool) -> EngineConfig:
    """The engine config the spec's fields mean (DeepSpeed's keys); an error names the spec's field."""
    assert train.steps is not None
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.micro_batches(replicas),
        "optimizer": {"type": train.optimizer.type, "params": dict(train.optimizer.params)},
        "gradient_clipping": train.gradient_clipping,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,  # progress.py logs every step, with tokens/s and MFU
    }
    if train.scheduler is not None:
        params = dict(train.scheduler.params)
        if train.scheduler.type != "WarmupLR":
            params.setdefault("total_num_steps", train.steps)
        config["scheduler"] = {"type": train.scheduler.type, "params": params}
    try:
        parsed = load_config(config)
        # built once on a stand-in parameter: a bad optimizer or scheduler argument fails here, before
        # the model is read, naming the spec's field
        assert parsed.optimizer is not None
        optimizer = build_optimizer(parsed.optimizer, [torch.nn.Parameter(torch.zeros(1))])
        if parsed.scheduler is not None:
            build_scheduler(parsed.scheduler, optimizer)
    except ConfigError as err:
        raise ConfigError(f"spec.train (optimizer, scheduler): {err}") from None
    return parsed


def export_path(spec: PipelineJobSpec, checkpoint_dir: Path) -> Path:
    assert spec.train is not None
    return Path(spec.train.export) if spec.train.export else checkpoint_dir / EXPORT_DIR


def _tokenizer(model_dir: str) -> Any:
    if (
        not (Path(model_dir) / "tokenizer_config.json").is_file()
        and not (Path(model_dir) / "tokenizer.json").is_file()
    ):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def _data(spec: PipelineJobSpec, arch: Arch) -> Any:
    train, model = spec.train, spec.model
    assert train is not None and model is not None and train.dataset is not None
    tokenizer = _tokenizer(model.path)
    eos = arch.eos_token_ids[0] if arch.eos_token_ids else getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    return read_samples(train.dataset, train.seq_length, train.packing, tokenizer, eos, pad, arch.vocab_size)


def build_stage(
    arch: Arch,
    topology: Topology,
    model_dir: str | Path,
    device: torch.device,
    partition_method: Any = "parameters",
    activation_checkpointing: bool = False,
) -> tuple[PipelineModule, list[Role]]:
    """This rank's part of the model: its stage's layers, tensor-parallel over the topology's tensor
    group when it has more than one rank, filled from ``model_dir`` (only this rank's shard is read)."""
    tensor_parallel = topology.layout.tensor_parallel
    check_tensor_parallel(arch, tensor_parallel)  # before any weight is read
    group = topology.tensor_group if tensor_parallel > 1 else None
    layers, roles = pipeline_layers(arch, tensor_parallel, topology.tp_rank, group)
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = causal_lm_loss
    if group is not None and vocab_parallel(arch, tensor_parallel):
        start = topology.tp_rank * (arch.vocab_size // tensor_parallel)
        loss_fn = functools.partial(vocab_parallel_causal_lm_loss, start=start, group=group)
    elif tensor_parallel > 1 and topology.rank == 0:
        log.warning(
            "the vocabulary is not split over the tensor ranks: tensorParallel does not divide it "
            "(the embedding and LM head are replicated)",
            extra={"vocab_size": arch.vocab_size, "tensor_parallel": tensor_parallel},
        )
    with torch.device("meta"):  # no random init to throw away: the checkpoint fills every parameter
        module = PipelineModule(
            layers,
            topology=topology,
            loss_fn=loss_fn,
            seed_layers=False,
            partition_method=partition_method,
            activation_checkpoint_interval=1 if activation_checkpointing else 0,
        )
        if tensor_parallel > 1:
            assert topology.tensor_group is not None, "tensor parallelism needs a process group"
            parallelize(module, topology.tensor_group)
        mark_layouts(module, roles, arch)  # at any tensorParallel: a checkpoint may resume with another
    module.to_empty(device=device)
    load_weights(module, roles, model_dir, arch, Shard(topology.tp_rank, tensor_parallel))
    return module, roles


def fine_tune(
    spec: PipelineJobSpec,
    topology: Topology,
    device: torch.device,
    checkpoint_dir: Path,
    job: str = "conveyor",
    on_step: Callable[[int, float], None] | None = None,
) -> Outcome:
    """Run (or resume) the fine-tuning on this rank; collective: every rank of the job calls it."""
    train, model_spec = spec.train, spec.model
    assert train is not None and model_spec is not None and train.steps is not None
    assert train.dataset is not None
    check_export_path(
        export_path(spec, checkpoint_dir),
        checkpoint_dir,
        model_spec.path,
        dataset=train.dataset,
        field="spec.train.export",
    )
    arch = load_arch(model_spec.path)
    check_seq_length(train.seq_length, arch.max_positions)  # (as the pre-flight did) before a weight is read
    dropout = {k: v for k in DROPOUT_FIELDS if (v := getattr(arch.hf_config, k, 0) or 0) > 0}
    if dropout and topology.rank == 0:
        log.warning("the model's dropout is not applied in fine-tuning (it trains without)", extra=dropout)
    module, roles = build_stage(
        arch,
        topology,
        model_spec.path,
        device,
        partition_method=spec.parallelism.partition_method,
        activation_checkpointing=train.activation_checkpointing,
    )
    bf16 = uses_bf16(train, device)
    replicas = topology.layout.replicas
    engine = PipelineEngine(module, engine_config(train, replicas, bf16), job=job, device=device)
    outcome = Outcome()
    every = spec.checkpoint.every if spec.checkpoint else train.steps
    keep = spec.checkpoint.keep if spec.checkpoint else None
    global_batch = train.micro_batch_size * engine.micro_batches * replicas
    identity = run_identity(spec, global_batch)
    resumed, client = engine.load_checkpoint(checkpoint_dir)
    # before any step, and before a run that finds the last checkpoint reports another run's export
    if resumed is not None and not check_run(client, identity, resumed, spec) and topology.rank == 0:
        log.warning(
            "the checkpoint does not say which run saved it (saved before runs were recorded): resumed "
            "as this run's",
            extra={"path": str(resumed)},
        )
    position = int(client["data_position"]) if client else 0
    outcome.resumed_from = engine.global_steps
    target = export_path(spec, checkpoint_dir)
    # the export of this very checkpoint: one made earlier at the same path (before the run was extended,
    # and the process killed between its last checkpoint and the new export) is not this run's result
    exported = {"step": engine.global_steps, "run": identity["digest"]}
    if engine.global_steps >= train.steps and read_record(target) == exported:
        log.info("fine-tuning already complete", extra={"step": engine.global_steps, "export": str(target)})
        outcome.export = target
        return outcome

    order = None
    if engine.is_first_stage() or engine.is_last_stage():  # only they read data
        order = DataOrder(_data(spec, arch), train.seed, global_batch, replicas, train.micro_batch_size)
    progress = Progress(
        job=job,
        tokens_per_step=global_batch * train.seq_length,
        flops_per_token=flops_per_token(arch, parameter_count(arch), train.seq_length),
        peak_per_gpu=peak_flops(device, bf16),
        gpus=topology.layout.world_size,
        is_logger=topology.rank == 0,
    )
    while engine.global_steps < train.steps:
        batches = order.micro_batches(position, topology.replica) if order is not None else None
        lr = engine.get_lr()[0]  # the rate this step runs at (after it, the schedule has moved on)
        loss = float(engine.train_batch(iter(batches) if batches is not None else None))
        position += global_batch
        step = engine.global_steps
        outcome.losses[step] = loss
        outcome.grad_norms[step] = engine.last_grad_norm
        progress.step(step, loss, engine.last_stats["step_seconds"], lr, engine.last_grad_norm)
        if on_step is not None:
            on_step(step, loss)
        if step % every == 0 or step == train.steps:
            engine.save_checkpoint(
                checkpoint_dir, client_state={"data_position": position, RUN_KEY: identity}, keep=keep
            )
    dtype = getattr(torch, model_spec.dtype)
    record = {"step": engine.global_steps, "run": identity["digest"]}
    outcome.export = export(module, roles, arch, topology, model_spec.path, target, dtype, record)
    if topology.rank == 0:
        log.info("model exported", extra={"path": str(target), "dtype": model_spec.dtype})
    return outcome


def run_rank(pod: Any, local_rank: int, termination_log: str | None = None) -> int:
    """``conveyor.rank``'s entry for a fine-tuning job (``pod``: its PodEnv)."""
    from conveyor.commit_protocol import resume_point, write_termination_message
    from conveyor.distributed import init_distributed
    from conveyor.preflight_gate import wait_at_gate
    from conveyor.skipped_checkpoints import with_skipped
    from conveyor.topology import Layout

    spec = pod.spec
    info = init_distributed(device=spec.device)
    wait_at_gate()  # the model is not read before the pre-flight checks (model directory, layout) pass
    topology = Topology(
        Layout(replicas=max(pod.replicas, 1), stages=pod.stages, tensor_parallel=pod.tensor_parallel)
    )
    assert spec.checkpoint is not None  # the spec requires it in train mode
    checkpoint_dir = Path(pod.checkpoint_dir or spec.checkpoint.path)
    fine_tune(spec, topology, info.device, checkpoint_dir, job=pod.job)
    if local_rank == 0 and termination_log:  # once per pod, as TrainSettings.finish does for scripts
        committed = resume_point(checkpoint_dir)
        report = with_skipped(committed.as_status() if committed else None, checkpoint_dir)
        write_termination_message(termination_log, True, report)
    return 0
