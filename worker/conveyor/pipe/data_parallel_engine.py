"""``DataParallelEngine``: DeepSpeed's engine API on a plain model, data parallel over every rank.

What DeepSpeed's tutorials write, ported by changing the import::

    engine, optimizer, loader, _ = conveyor.initialize(model=net, model_parameters=net.parameters(),
                                                       training_data=dataset, config="ds_config.json")
    for x, y in loader:
        loss = criterion(engine(x.to(engine.device)), y.to(engine.device))
        engine.backward(loss)
        engine.step()

``backward`` scales the loss by 1 / gradient_accumulation_steps; ``step`` acts only at the accumulation
boundary (every ``gradient_accumulation_steps`` calls): gradients averaged over the ranks, clipped by
their global norm, optimizer and scheduler stepped. Every rank starts from rank 0's weights. bf16 runs
the forward under autocast with fp32 weights (the master copy). Checkpoints are pipe/checkpoint.py's.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from conveyor import metrics
from conveyor.log import get_logger
from conveyor.pipe import checkpoint as pipe_checkpoint
from conveyor.pipe.config import ConfigError, EngineConfig, load_config
from conveyor.pipe.optim import (
    build_optimizer,
    build_scheduler,
    client_optimizer,
    client_scheduler,
    trainable,
)
from conveyor.watchdog import PROGRESS

log = get_logger("conveyor.engine")


class DataParallelEngine(pipe_checkpoint.CheckpointMethods):
    def __init__(
        self,
        model: nn.Module,
        config: EngineConfig | dict[str, Any] | str | Path,
        optimizer: torch.optim.Optimizer | None = None,
        model_parameters: Iterable[Any] | None = None,
        lr_scheduler: Any = None,
        training_data: Any = None,
        collate_fn: Any = None,
        job: str | None = None,
        device: torch.device | str | None = None,
    ):
        self.config = load_config(config)
        if self.config.fp16.enabled:
            raise ConfigError(
                "config.fp16: the data-parallel engine runs fp32 or bf16: set bf16.enabled instead"
            )
        self._dist = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if self._dist else 1
        self.global_rank = dist.get_rank() if self._dist else 0
        self.local_rank = 0  # set by initialize from LOCAL_RANK, as DeepSpeed's engine has it
        self.dp_world_size = self.world_size
        self.job = job or "conveyor"
        self._train_batch_size, self.micro_batch_size, self.accumulation = self.config.resolve_batch(
            self.world_size
        )
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.module = model.to(self.device)
        self._broadcast_weights()
        params = trainable(model_parameters, model)
        if optimizer is None:
            if self.config.optimizer is None:
                raise ValueError("no optimizer: add an `optimizer` section to the config or pass optimizer=")
            optimizer = build_optimizer(self.config.optimizer, params)
        self.optimizer = client_optimizer(optimizer, params)
        if lr_scheduler is None and self.config.scheduler is not None:
            lr_scheduler = build_scheduler(self.config.scheduler, self.optimizer)
        self.lr_scheduler = client_scheduler(lr_scheduler, self.optimizer)
        self.global_steps = 0
        self.global_samples = 0
        self.micro_steps = 0
        self.last_grad_norm: float | None = None
        self._step_started = time.perf_counter()
        self._losses: list[float] = []
        self.training_dataloader = (
            self._make_loader(training_data, collate_fn) if training_data is not None else None
        )

    def _broadcast_weights(self) -> None:
        if not self._dist or self.world_size == 1:
            return
        with torch.no_grad():  # every replica starts from rank 0's weights, whatever seeded them
            for tensor in itertools.chain(self.module.parameters(), self.module.buffers()):
                dist.broadcast(tensor.data, src=0)

    def _make_loader(self, dataset: Any, collate_fn: Any) -> Any:
        from torch.utils.data import DataLoader, DistributedSampler

        sampler: Any = None
        if self.world_size > 1:
            sampler = DistributedSampler(dataset, self.world_size, self.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=self.micro_batch_size, sampler=sampler, collate_fn=collate_fn)

    # ---- DeepSpeed's accessors ------------------------------------------------------------------------
    def train_batch_size(self) -> int:
        return self._train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.micro_batch_size

    def gradient_accumulation_steps(self) -> int:
        return self.accumulation

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.accumulation == 0

    def train(self, mode: bool = True) -> DataParallelEngine:
        self.module.train(mode)
        return self

    def eval(self) -> DataParallelEngine:
        return self.train(False)

    # ---- forward, backward, step ----------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.bf16.enabled:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._autocast():
            return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Accumulate ``loss``'s gradients, scaled so that a boundary's gradient is the mean over its
        micro-batches (and, after ``step``'s all-reduce, over the ranks)."""
        self._losses.append(float(loss.detach().float()))
        (loss.float() / self.accumulation).backward()
        return loss

    def step(self) -> None:
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        self._average_gradients()
        if self.config.gradient_clipping > 0:
            params = [p for p in self.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.gradient_clipping)
            self.last_grad_norm = float(norm)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # as DeepSpeed's engine: every module gradient, also of parameters left out of the optimizer
        self.module.zero_grad(set_to_none=True)
        self.global_steps += 1
        self.global_samples += self._train_batch_size
        self._publish()

    def _average_gradients(self) -> None:
        if not self._dist or self.world_size == 1:
            return
        params = [p for p in self.module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # a parameter this rank's batch did not reach still joins the all-reduce
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            assert p.grad is not None
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = _flatten_dense_tensors(grads)  # one all-reduce per dtype, not one per tensor
            dist.all_reduce(flat)
            flat /= self.world_size
            for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(reduced)

    def _publish(self) -> None:
        now = time.perf_counter()
        seconds, self._step_started = now - self._step_started, now
        loss = sum(self._losses) / max(1, len(self._losses))  # this rank's micro-batches
        self._losses = []
        metrics.STEP_SECONDS.labels(self.job).observe(seconds)
        PROGRESS.beat()  # the liveness probe's evidence of progress: without it a hang is never seen
        metrics.LOSS.labels(self.job).set(loss)
        metrics.TRAIN_STEP.labels(self.job).set(self.global_steps)
        if self.global_steps % self.config.steps_per_print == 0 and self.global_rank == 0:
            log.info(
                "train step",
                extra={
                    "step": self.global_steps,
                    "loss": loss,
                    "lr": self.get_lr()[0],
                    "grad_norm": self.last_grad_norm,
                    "step_seconds": round(seconds, 4),
                    "samples_per_second": round(self._train_batch_size / seconds, 2),
                },
            )
        metrics.export_to_rank()  # a train.command program's metrics, for its rank's /metrics

    # ---- checkpoints (pipe/checkpoint.py's TrainState) ------------------------------------------------
    def train_parts(self) -> pipe_checkpoint.TrainParts:
        return pipe_checkpoint.TrainParts(
            self.module, self.optimizer, self.lr_scheduler, (self.world_size, 1, 1)
        )

    def counters(self) -> dict[str, Any]:
        return {"step": self.global_steps, "samples": self.global_samples}

    def restore_counters(self, counters: dict[str, Any]) -> None:
        self.global_steps = counters["step"]
        self.global_samples = counters["samples"]
        # micro-steps counted afresh at a boundary, as DeepSpeed does: the saved count (of another
        # accumulation, or part-way through a batch whose gradients are not saved) put the first boundary
        # part-way into a batch, a step on part of its gradient
        self.micro_steps = self.global_steps * self.accumulation
