"""``PipelineEngine``: runs a batch of micro-batches through the stages on a schedule, then one optimizer
step. DeepSpeed's API: ``engine, optimizer, _, _ = conveyor.initialize(model=net, config=cfg)`` then
``loss = engine.train_batch(data_iter)`` (``initialize``: pipe/initialization.py).

Per batch: the first and last stage pull ``micro_batches`` (inputs, labels) pairs from the iterator; the
stage executes its step list from schedule.py (schedule_runner.py; p2p.py moves the tensors); then
gradients are summed over the stages holding a tied weight, averaged over data-parallel replicas (each
tensor rank with its own data group), clipped by the norm of the *whole* model's gradient (every stage,
tied weights once, tensor-parallel shards summed over the tensor group), and the optimizer steps. The
returned loss is the mean over all micro-batches and replicas, on every rank.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from conveyor import metrics
from conveyor.log import get_logger
from conveyor.pipe import checkpoint as pipe_checkpoint
from conveyor.pipe.config import EngineConfig, load_config
from conveyor.pipe.grad_norm import global_grad_norm
from conveyor.pipe.loss_scaler import LossScaler
from conveyor.pipe.module import PipelineModule
from conveyor.pipe.optim import (
    build_optimizer,
    build_scheduler,
    client_optimizer,
    client_scheduler,
    trainable,
)
from conveyor.pipe.p2p import P2P, BoundaryMeta
from conveyor.pipe.schedule import Schedule
from conveyor.pipe.schedule_runner import BatchState, DataExhaustedError, PipelineCommError, ScheduleRunner
from conveyor.pipe.sharding import shard_key, shard_layouts, sharded_parameters
from conveyor.topology import LayoutError
from conveyor.watchdog import PROGRESS

log = get_logger("conveyor.pipe")
_serial = itertools.count()  # engines are created in the same order on every rank

# The errors train_batch and eval_batch raise (schedule_runner.py), importable from here as before.
__all__ = ["DataExhaustedError", "PipelineCommError", "PipelineEngine"]


class PipelineEngine(ScheduleRunner, pipe_checkpoint.CheckpointMethods):
    def __init__(
        self,
        model: PipelineModule,
        config: EngineConfig | dict[str, Any] | str | Path,
        optimizer: torch.optim.Optimizer | None = None,
        model_parameters: Iterable[Any] | None = None,
        lr_scheduler: Any = None,
        training_data: Any = None,
        collate_fn: Any = None,
        job: str | None = None,
        device: torch.device | str | None = None,
    ):
        if not isinstance(model, PipelineModule):
            raise TypeError(
                f"conveyor.initialize needs a conveyor.pipe.PipelineModule, got {type(model).__name__}: wrap the "
                "model's layers in PipelineModule(layers=[...], num_stages=...)"
            )
        self.config = load_config(config)
        self._dist = dist.is_available() and dist.is_initialized()
        if self._dist and model.topology.layout.world_size != dist.get_world_size():
            # built before the process group existed (initialize joined it): a layout of one rank here
            # would train each process as its own model, no gradient averaged
            raise LayoutError(
                f"PipelineModule was built for {model.topology.layout.world_size} rank(s) but the process group "
                f"has {dist.get_world_size()} ranks: call conveyor.init_distributed() before building the "
                "PipelineModule"
            )
        self.module = model
        self.topology = model.topology
        self.layout = self.topology.layout
        self.stage_id, self.num_stages = model.stage_id, model.num_stages
        self.dp_world_size = self.layout.replicas
        self.job = job or "conveyor"
        self.local_rank = 0  # set by initialize from LOCAL_RANK, as DeepSpeed's engine has it
        self._serial = next(_serial)
        self._train_batch_size, self.micro_batch_size, self.micro_batches = self.config.resolve_batch(
            self.dp_world_size
        )
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        model.to(self.device)
        self._sync_initial_weights()

        params = trainable(model_parameters, model)
        if optimizer is None:
            if self.config.optimizer is None:
                raise ValueError("no optimizer: add an `optimizer` section to the config or pass optimizer=")
            if not params:
                raise ValueError(
                    f"stage {self.stage_id} holds no trainable parameters (layers {model.start}..{model.stop - 1}): "
                    "choose a partition_method that gives every stage a layer with weights"
                )
            optimizer = build_optimizer(self.config.optimizer, params)
        self.optimizer = client_optimizer(optimizer, params)
        if lr_scheduler is None and self.config.scheduler is not None:
            lr_scheduler = build_scheduler(self.config.scheduler, self.optimizer)
        self.lr_scheduler = client_scheduler(lr_scheduler, self.optimizer)

        self.p2p = P2P({s: self.topology.stage_rank(s) for s in range(self.num_stages)}, self.device)
        self._meta: dict[tuple[str, str], BoundaryMeta] = {}  # (train|eval, in|out) -> boundary metadata
        self._schedules: dict[tuple[str, int], Schedule] = {}
        self.global_steps = 0
        self.global_samples = 0
        self._calls = 0
        self.last_grad_norm: float | None = None
        self.last_stats: dict[str, float] = {}
        self.loss_scaler = LossScaler(self.config.fp16) if self.config.fp16.enabled else None
        self.skipped_steps = 0

        self.training_dataloader = None
        self._data_iterator: Iterator[Any] | None = None
        if training_data is not None:
            self.training_dataloader = self._make_loader(training_data, collate_fn)

    def _sync_initial_weights(self) -> None:
        """Replicas start from replica 0's weights and tied copies from their first stage's (seeded
        construction already makes them equal; this makes it true for any user-built module too)."""
        if not self._dist:
            return
        with torch.no_grad():
            if self.dp_world_size > 1:
                src = self.layout.rank(0, self.stage_id, self.topology.tp_rank)
                for tensor in itertools.chain(self.module.parameters(), self.module.buffers()):
                    dist.broadcast(tensor.data, src=src, group=self.topology.data_group)
            for key, (group, ranks) in self.module.tied_groups.items():
                for param in self.module.tied_parameters(key):
                    dist.broadcast(param.data, src=ranks[0], group=group)

    def _train_batch_only(self, *_: Any, **__: Any) -> Any:
        # as DeepSpeed's PipelineEngine: the schedule runs forward, backward and step together
        raise RuntimeError(
            "a PipelineModule's engine trains with engine.train_batch(data_iter) (forward, backward and step "
            "in one call) and evaluates with engine.eval_batch(data_iter); engine(x), engine.backward(loss) "
            "and engine.step() are the engine of a plain nn.Module's"
        )

    __call__ = forward = backward = step = _train_batch_only

    # ---- DeepSpeed-compatible accessors -------------------------------------------------------------
    def train_batch_size(self) -> int:
        return self._train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.micro_batch_size

    def gradient_accumulation_steps(self) -> int:
        return self.micro_batches

    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    def is_last_stage(self) -> bool:
        return self.stage_id == self.num_stages - 1

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    @property
    def loss_scale(self) -> float:
        """The scale of the next batch's loss: fp16's (``loss_scaler``), else 1."""
        return self.loss_scaler.cur_scale if self.loss_scaler is not None else 1.0

    def _make_loader(self, dataset: Any, collate_fn: Any) -> Any:
        from torch.utils.data import DataLoader, DistributedSampler

        from conveyor.utils import RepeatingLoader

        sampler: Any = None
        if self.dp_world_size > 1:
            sampler = DistributedSampler(dataset, self.dp_world_size, self.topology.replica, shuffle=False)
        # why drop_last: a stage boundary carries one shape (its metadata is exchanged once), so an epoch's
        # smaller last micro-batch would stop a pipeline mid-schedule; dropped on every layout alike
        loader = DataLoader(
            dataset, batch_size=self.micro_batch_size, sampler=sampler, collate_fn=collate_fn, drop_last=True
        )
        try:
            empty = len(loader) == 0
        except TypeError:  # an iterable dataset has no length
            empty = False
        if empty:
            raise ValueError(
                f"training_data has {len(dataset)} samples, fewer than one micro-batch per replica "
                f"(train_micro_batch_size_per_gpu {self.micro_batch_size} x {self.dp_world_size} replicas): "
                "give more samples or a smaller micro-batch"
            )
        if self.is_first_stage() or self.is_last_stage():
            self._data_iterator = iter(RepeatingLoader(loader))
        return loader

    # ---- one batch ------------------------------------------------------------------------------------
    def train_batch(self, data_iter: Iterator[Any] | None = None) -> torch.Tensor:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns the mean loss of
        all micro-batches and data-parallel replicas, on every rank."""
        if not torch.is_grad_enabled():
            # as DeepSpeed's: else the last stage's backward fails mid-schedule, its neighbours waiting
            raise RuntimeError(
                "train_batch needs gradients but runs under torch.no_grad(): use eval_batch for forward only"
            )
        started = time.perf_counter()
        self.module.train()
        waited = self.p2p.wait_seconds
        batch = self._run(self.config.pipeline.schedule, data_iter, training=True)
        self._reduce_tied_gradients()
        self._reduce_data_parallel_gradients()
        if self._finish_precision():
            self.last_grad_norm = self._clip_gradients()
            self.optimizer.step()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # as DeepSpeed's engine: every module gradient, also of parameters left out of the optimizer
        self.module.zero_grad(set_to_none=True)
        loss = self._mean_loss(batch)
        self.global_steps += 1
        self.global_samples += self._train_batch_size
        self._publish(batch, loss, time.perf_counter() - started, self.p2p.wait_seconds - waited)
        return loss

    def eval_batch(self, data_iter: Iterator[Any] | None = None) -> torch.Tensor:
        """Forward only over one batch; the mean loss of all micro-batches and replicas, on every rank."""
        self.module.eval()
        with torch.no_grad():
            batch = self._run("forward", data_iter, training=False)
        return self._mean_loss(batch)

    # ---- after the schedule -------------------------------------------------------------------------
    def _reduce_tied_gradients(self) -> None:
        # Each stage holding a tied weight saw only its own uses; the sum is the true gradient.
        for key, (group, _) in self.module.tied_groups.items():
            for param in self.module.tied_parameters(key):
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad, group=group)

    def _reduce_data_parallel_gradients(self) -> None:
        if self.dp_world_size == 1 or not self._dist:
            return
        params = [p for p in self.module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            assert p.grad is not None
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = _flatten_dense_tensors(grads)  # one all-reduce per dtype instead of one per tensor
            dist.all_reduce(flat, group=self.topology.data_group)
            flat /= self.dp_world_size
            for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(reduced)

    def _finish_precision(self) -> bool:
        """fp16: unscale, and skip the step on any overflow anywhere (all ranks agree). True to step."""
        if self.loss_scaler is None:
            return True
        scale = self.loss_scaler.cur_scale
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        for grad in grads:
            grad.mul_(1.0 / scale)
        overflow = torch.tensor(
            [0.0 if all(torch.isfinite(g).all() for g in grads) else 1.0], device=self.device
        )
        if self._dist:
            dist.all_reduce(overflow, op=dist.ReduceOp.MAX)
        skipped = bool(overflow.item())
        self.loss_scaler.update(skipped)  # every rank alike: the flag is agreed, the state identical
        if skipped:
            self.skipped_steps += 1
            log.warning(
                "fp16 overflow: step skipped",
                extra={"step": self.global_steps, "loss_scale": scale, "next_loss_scale": self.loss_scale},
            )
        return not skipped

    def _clip_gradients(self) -> float | None:
        """Clip by the norm of the whole model's gradient (grad_norm.py: every parameter counted once)."""
        max_norm = self.config.gradient_clipping
        if max_norm <= 0:
            return None
        norm = global_grad_norm(self.module, self.device, self._dist)
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # the formula of torch's clip_grad_norm_
        for grad in grads:
            grad.mul_(coef.to(grad.dtype))
        return float(norm.item())

    def _mean_loss(self, batch: BatchState) -> torch.Tensor:
        loss = torch.zeros(1, dtype=torch.float32, device=self.device)
        if self.is_last_stage():
            loss += torch.stack([batch.losses[mb].detach() for mb in sorted(batch.losses)]).mean()
            if self._dist and self.dp_world_size > 1:
                dist.all_reduce(loss, group=self.topology.data_group)
                loss /= self.dp_world_size
        if self._dist and self.num_stages > 1:
            # every rank returns the loss, as DeepSpeed does
            dist.broadcast(
                loss, src=self.topology.stage_rank(self.num_stages - 1), group=self.topology.pipe_group
            )
        return loss[0]

    def _publish(self, batch: BatchState, loss: torch.Tensor, seconds: float, waited: float) -> None:
        value = float(loss.item())
        self.last_stats = {
            "step_seconds": seconds,
            "compute_seconds": batch.compute_seconds,
            "wait_seconds": waited,
            "peak_live_micro_batches": batch.peak_live,
        }
        metrics.STEP_SECONDS.labels(self.job).observe(seconds)
        PROGRESS.beat()  # the liveness probe's evidence of progress (watchdog.py)
        metrics.LOSS.labels(self.job).set(value)
        metrics.TRAIN_STEP.labels(self.job).set(self.global_steps)
        metrics.BUBBLE_SECONDS.labels(self.job, str(self.stage_id)).inc(waited)
        if self.global_steps % self.config.steps_per_print == 0 and self.topology.rank == 0:
            log.info(
                "train step",
                extra={
                    "step": self.global_steps,
                    "loss": value,
                    "lr": self.get_lr()[0],
                    "grad_norm": self.last_grad_norm,
                    "step_seconds": round(seconds, 4),
                    "samples_per_second": round(self._train_batch_size / seconds, 2),
                    "bubble_seconds": round(waited, 4),
                },
            )
        metrics.export_to_rank()  # a train.command program's metrics, for its rank's /metrics

    # ---- checkpoints -----------------------------------------------------------------------------------
    def train_parts(self) -> pipe_checkpoint.TrainParts:
        layout = self.layout
        tp, size = self.topology.tp_rank, layout.tensor_parallel
        return pipe_checkpoint.TrainParts(
            self.module,
            self.optimizer,
            self.lr_scheduler,
            (layout.replicas, layout.stages, layout.tensor_parallel),
            {name: shard_key(name, tp, size) for name in sharded_parameters(self.module)},
            shard_layouts(self.module),
            tp,
        )

    def counters(self) -> dict[str, Any]:
        return {
            "step": self.global_steps,
            "samples": self.global_samples,
            # fp16's scaler whole, settings and state (DeepSpeed's ZeRO optimizers save the object)
            "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
            "skipped_steps": self.skipped_steps,
        }

    def restore_counters(self, counters: dict[str, Any]) -> None:
        self.global_steps = counters["step"]
        self.global_samples = counters["samples"]
        self.skipped_steps = counters.get("skipped_steps", 0)
        saved = counters.get("loss_scaler")
        if self.loss_scaler is None:
            return  # (a checkpoint of an fp16 run resumed in bf16 or fp32: no scale to restore)
        if saved is not None:
            kept = self.loss_scaler.restore(saved)
            if kept and (not self._dist or dist.get_rank() == 0):
                log.info(
                    "fp16 loss scaling resumes with the checkpoint's settings (as DeepSpeed's does), not the "
                    "config's: "
                    + ", ".join(f"{key} {was!r} (config: {now!r})" for key, (was, now) in kept.items())
                )
        elif counters.get("loss_scale", 1.0) != 1.0:
            # an older release's checkpoint of an fp16 run (it saved 1.0 for bf16 and fp32 runs, which would
            # not be an fp16 run's scale to resume at)
            self.loss_scaler.restore_legacy(
                counters["loss_scale"], counters.get("good_steps", 0), self.global_steps
            )
