"""How a ``PipelineEngine`` runs one batch on its stage: pull the micro-batches (first and last stage),
then execute the stage's step list from schedule.py (forward, backward, and the sends and receives that
p2p.py moves), keeping each micro-batch's tensors only until they are used. A failed send or receive
becomes a ``PipelineCommError`` with the grid of where every stage of the pipeline stopped.

``ScheduleRunner`` is a base of ``PipelineEngine`` (engine.py), which sets the attributes declared below.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from conveyor.log import get_logger
from conveyor.pipe.config import EngineConfig
from conveyor.pipe.module import PipelineModule
from conveyor.pipe.p2p import P2P, BoundaryError, BoundaryMeta, describe, flatten, unflatten
from conveyor.pipe.schedule import Kind, Schedule, Step, build_schedule, format_grid
from conveyor.topology import Topology

log = get_logger("conveyor.pipe")


class DataExhaustedError(RuntimeError):
    pass


class PipelineCommError(RuntimeError):
    """A send or receive failed or timed out; the message holds the schedule grid and where ranks were."""


@dataclass
class BatchState:
    """Per-batch state, keyed by micro-batch; entries are dropped as soon as they are used."""

    data: list[Any]
    received: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # inputs from stage - 1
    outputs: dict[int, tuple[tuple[torch.Tensor, ...], bool]] = field(default_factory=dict)  # to stage + 1
    grads_in: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # d loss / d outputs
    grads_out: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # d loss / d inputs
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    compute_seconds: float = 0.0
    live: int = 0
    peak_live: int = 0


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    return value


class ScheduleRunner:
    """The schedule execution of ``PipelineEngine``: ``_run`` takes one batch through the stage's steps."""

    # set by PipelineEngine.__init__
    module: PipelineModule
    config: EngineConfig
    topology: Topology
    device: torch.device
    p2p: P2P
    stage_id: int
    num_stages: int
    micro_batches: int
    global_steps: int
    _dist: bool
    _data_iterator: Iterator[Any] | None
    _meta: dict[tuple[str, str], BoundaryMeta]  # (train|eval, in|out) -> boundary metadata
    _schedules: dict[tuple[str, int], Schedule]
    _calls: int
    _serial: int

    if TYPE_CHECKING:

        @property
        def loss_scale(self) -> float: ...

        def is_first_stage(self) -> bool: ...

        def is_last_stage(self) -> bool: ...

    def _schedule(self, name: str) -> list[Step]:
        key = (name, self.micro_batches)
        if key not in self._schedules:
            self._schedules[key] = build_schedule(name, self.num_stages, self.micro_batches)
        return self._schedules[key][self.stage_id]

    def _run(self, name: str, data_iter: Iterator[Any] | None, training: bool) -> BatchState:
        self._calls += 1
        steps = self._schedule(name)
        batch = BatchState(self._load(data_iter, training))
        for position, step in enumerate(steps):
            act = step[0]
            if act.kind == Kind.FORWARD:
                self._forward(act.micro_batch, batch, training)
            elif act.kind == Kind.BACKWARD:
                self._backward(act.micro_batch, batch)
            else:
                try:
                    self._communicate(step, batch, training)
                except (RuntimeError, dist.DistError) as err:
                    raise self._comm_failure(name, position, err) from err
        return batch

    def _load(self, data_iter: Iterator[Any] | None, training: bool) -> list[Any]:
        """The batch's (inputs, labels) pairs on the first and last stage; every rank learns if any
        rank's iterator failed, so all of them stop with an error instead of waiting on a dead peer.
        Only training falls back to the training_data loader (an evaluation would take its batches)."""
        items: list[Any] = []
        error = ""
        raised: Exception | None = None  # the iterator's own error, re-raised here after the others learn
        if self.is_first_stage() or self.is_last_stage():
            source = data_iter if data_iter is not None else (self._data_iterator if training else None)
            if source is None and not training:
                error = (
                    "eval_batch needs data_iter on the first and last stage, as DeepSpeed's does: the "
                    "training_data loader's batches are train_batch's"
                )
            elif source is None:
                error = "train_batch needs data_iter on the first and last stage (or training_data=)"
            else:
                for i in range(self.micro_batches):
                    try:
                        item = next(source)
                    except StopIteration:
                        error = (
                            f"the data iterator ran dry after {i} of {self.micro_batches} micro-batches of step "
                            f"{self.global_steps}: wrap the loader in conveyor.utils.RepeatingLoader or stop earlier"
                        )
                        break
                    except Exception as err:  # a bad record, a dead worker: still tell the peers first
                        raised, error = err, f"the data iterator raised {type(err).__name__}: {err}"
                        break
                    if not (isinstance(item, (tuple, list)) and len(item) == 2):
                        error = "the data iterator must yield (inputs, labels) pairs, as DeepSpeed's pipeline does"
                        break
                    items.append(_to_device(item, self.device))
        failed = torch.tensor([1.0 if error else 0.0], device=self.device)
        if self._dist:
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)  # one scalar per batch: all ranks stop together
        if raised is not None:
            raise raised
        if failed.item():
            raise DataExhaustedError(error or "a peer stage's data iterator failed (see that rank's error)")
        return items

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.bf16.enabled:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.config.fp16.enabled:
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def _forward(self, mb: int, batch: BatchState, training: bool) -> None:
        started = time.perf_counter()
        if self.is_first_stage():
            x = batch.data[mb][0]
        else:
            x = unflatten(batch.received[mb], self._meta[(self._mode(training), "in")].is_tuple)
        with self._autocast():
            out = self.module(x)
            if self.is_last_stage():
                labels = batch.data[mb][1]
                loss = out if self.module.loss_fn is None else self.module.loss_fn(out, labels)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise TypeError(
                        "the last stage must produce a scalar loss (set loss_fn= on PipelineModule)"
                    )
                batch.losses[mb] = loss.float()
        if not self.is_last_stage():
            batch.outputs[mb] = flatten(out, f"stage {self.stage_id} output")  # kept with its graph
        if not training:
            batch.received.pop(mb, None)
        batch.live += 1
        batch.peak_live = max(batch.peak_live, batch.live)
        batch.compute_seconds += time.perf_counter() - started

    def _backward(self, mb: int, batch: BatchState) -> None:
        started = time.perf_counter()
        if self.is_last_stage():
            # mean over the batch's micro-batches; fp16 scales the loss so small gradients survive
            (batch.losses[mb] * (self.loss_scale / self.micro_batches)).backward()
        else:
            meta = self._meta[("train", "out")]
            outputs = batch.outputs.pop(mb)[0]
            torch.autograd.backward([outputs[i] for i in meta.grad_indices], batch.grads_in.pop(mb))
        if not self.is_first_stage():
            inputs = batch.received.pop(mb)
            grads = []
            for i in self._meta[("train", "in")].grad_indices:
                grad = inputs[i].grad
                grads.append(torch.zeros_like(inputs[i]) if grad is None else grad)
            batch.grads_out[mb] = grads
        batch.live -= 1
        batch.compute_seconds += time.perf_counter() - started

    @staticmethod
    def _mode(training: bool) -> str:
        return "train" if training else "eval"

    def _communicate(self, step: Step, batch: BatchState, training: bool) -> None:
        mode = self._mode(training)
        ops: list[dist.P2POp] = []
        received: list[tuple[int, BoundaryMeta]] = []
        for act in step:
            mb = act.micro_batch
            if act.kind == Kind.SEND_F:
                tensors, is_tuple = batch.outputs[mb] if training else batch.outputs.pop(mb)
                meta = describe(tensors, is_tuple)
                cached = self._meta.get((mode, "out"))
                if cached is None:
                    self.p2p.send_meta(self.stage_id + 1, meta)
                    self._meta[(mode, "out")] = meta
                elif cached != meta:
                    raise BoundaryError(
                        f"stage {self.stage_id} output changed from {cached} to {meta}: every micro-batch must "
                        "produce the same shapes and dtypes (metadata is exchanged once)"
                    )
                ops += self.p2p.isend(self.stage_id + 1, [t.detach() for t in tensors])
            elif act.kind == Kind.RECV_F:
                if (mode, "in") not in self._meta:
                    self._meta[(mode, "in")] = self.p2p.recv_meta(self.stage_id - 1)
                meta = self._meta[(mode, "in")]
                buffers = [t.empty(self.device) for t in meta.tensors]
                batch.received[mb] = buffers
                received.append((mb, meta))
                ops += self.p2p.irecv(self.stage_id - 1, buffers)
            elif act.kind == Kind.RECV_B:
                meta = self._meta[("train", "out")]
                buffers = [meta.tensors[i].empty(self.device) for i in meta.grad_indices]
                batch.grads_in[mb] = buffers
                ops += self.p2p.irecv(self.stage_id + 1, buffers)
            elif act.kind == Kind.SEND_B:
                ops += self.p2p.isend(self.stage_id - 1, batch.grads_out.pop(mb))
        self.p2p.run(ops)
        if training:
            for mb, meta in received:
                for i in meta.grad_indices:
                    batch.received[mb][i].requires_grad_()

    def _comm_failure(self, name: str, position: int, err: BaseException) -> PipelineCommError:
        """Gather where every stage of this pipeline stopped (through the rendezvous store, which still
        works when a collective has hung) and print the grid."""
        positions: dict[int, int | None] = {s: None for s in range(self.num_stages)}
        positions[self.stage_id] = position
        prefix = f"conveyor/pipe/{self._serial}/{self.topology.replica}/{self._calls}/"
        try:
            store = dist.distributed_c10d._get_default_store()
            store.set(prefix + str(self.stage_id), str(position))
            deadline = time.monotonic() + 5.0
            for stage in range(self.num_stages):
                if stage == self.stage_id:
                    continue
                try:
                    store.wait(
                        [prefix + str(stage)], timedelta(seconds=max(0.1, deadline - time.monotonic()))
                    )
                    positions[stage] = int(store.get(prefix + str(stage)))
                except Exception:  # that stage died or is stuck elsewhere: stays "?"
                    pass
        except Exception:
            pass
        grid = format_grid(self._schedules[(name, self.micro_batches)], positions)
        message = (
            f"pipeline {name} step {self.global_steps}: stage {self.stage_id} failed at schedule step {position} "
            f"({type(err).__name__}: {err}); '>' marks where each stage was, '?' a stage that did not answer:\n{grid}"
        )
        log.error(
            "pipeline communication failed",
            extra={"stage": self.stage_id, "position": position, "grid": grid},
        )
        return PipelineCommError(message)
