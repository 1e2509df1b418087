"""One stage of the generation pipeline: its peers, and the worker that runs the items stage 0 sends.

A work item is metadata (``StageWorker.pack``: kind, lanes, positions, sampling keys and steps, prompt
tokens) plus, past stage 0, the previous stage's hidden states. The kinds: prefill (prompts into their
lanes from position 0), extend (a later chunk of a long prompt), decode (one token for every lane of a
micro-batch), idle (stage 0 is alive with nothing to do: passed on, so no receive times out) and stop. Stage 0's scheduler is in generate.py; stages > 0 run ``StageWorker.follow``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from conveyor.inference.kernels.cuda_graphs import CompiledStage
from conveyor.inference.model.stage_model import StageModel
from conveyor.inference.pipeline.p2p import Channel, meta_group
from conveyor.inference.pipeline.sampling import SamplingParams, sample

PREFILL, DECODE, STOP, EXTEND, IDLE = 1, 2, 0, 3, 4
HEADER = 5  # kind, lane_start, n, S, kv_len


@dataclass
class PipelinePeers:
    """Where this rank sits: its stage, and the global ranks it talks to (same replica and tp rank)."""

    stage: int
    stages: int
    prev_rank: int | None
    next_rank: int | None
    first_rank: int  # stage 0 of this pipeline (where tokens go back)
    last_rank: int
    tensor_group: Any = None  # tensor-parallel group of this stage, or None
    tensor_src: int = 0  # global rank of tp rank 0 of this stage
    meta_group: Any = None  # gloo group for item metadata (p2p.py); None: the default group

    @classmethod
    def from_topology(cls, topo: Any) -> PipelinePeers:
        """Every rank calls this (it creates the metadata group when there is more than one stage)."""
        return cls(
            stage=topo.stage,
            stages=topo.num_stages,
            prev_rank=topo.prev_rank,
            next_rank=topo.next_rank,
            first_rank=topo.stage_rank(0),
            last_rank=topo.stage_rank(topo.num_stages - 1),
            tensor_group=topo.tensor_group if topo.layout.tensor_parallel > 1 else None,
            tensor_src=topo.layout.rank(topo.replica, topo.stage, 0),
            meta_group=meta_group() if dist.is_initialized() and dist.get_world_size() > 1 else None,
        )

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1


class StageWorker:
    """Runs work items on this rank's stage model; the last stage samples."""

    def __init__(self, model: StageModel, peers: PipelinePeers, params: SamplingParams, device: torch.device):
        self.model, self.peers, self.params, self.device = model, peers, params, device
        assert model.cache is not None, "setup_cache() before generating"
        self.channel = Channel(device, model.compute_dtype, peers.meta_group)
        self.compiled = CompiledStage.of(model)  # as the rank builder warmed it up (eager if it did not)
        self.scratch = model.cache.scratch_position
        self.seen: torch.Tensor | None = None
        self.lane_sampling: dict[int, SamplingParams] = {}  # lanes whose request has its own
        if peers.is_last and params.repetition_penalty != 1.0:
            self.seen = torch.zeros(
                model.cache.lanes_total, model.arch.vocab_size, dtype=torch.bool, device=device
            )

    @staticmethod
    def pack(
        kind: int,
        lane_start: int,
        positions: torch.Tensor,
        keys: list[int],
        steps: list[int],
        tokens: torch.Tensor | None = None,
        kv_len: int = 0,
        lanes: list[int] | None = None,
        sampling: list[SamplingParams | None] | None = None,
    ) -> torch.Tensor:
        """meta [5 + n*S + 3n (+ n*S (+ 5n))]: kind, lane_start, n, S, kv_len, positions, keys, steps,
        lanes (, tokens (, sampling)).

        A decode item's lanes are [lane_start, lane_start + n); a prefill item's are listed in ``lanes``
        (the free lanes of a micro-batch need not be contiguous). Prefill items carry their prompt
        tokens (the last stage needs them for the repetition penalty), and may carry each request's own
        sampling parameters, which the last stage keeps for the lane until its next prefill (None: the
        job's); decode items do neither: stage 0 feeds each lane the token sampled last, which stays on
        the device."""
        n, s = positions.shape
        lanes = lanes if lanes is not None else list(range(lane_start, lane_start + n))
        head = torch.tensor([kind, lane_start, n, s, kv_len, *keys, *steps, *lanes], dtype=torch.int64)
        parts = [head[:HEADER], positions.flatten().cpu(), head[HEADER:]]
        if tokens is not None:
            parts.append(tokens.flatten().cpu())
            if sampling is not None:
                parts.append(_pack_sampling(sampling))
        return torch.cat(parts)

    @staticmethod
    def header(meta: torch.Tensor) -> tuple[int, int, int, int, int]:
        """kind, lane_start, n, S, kv_len (host ints: on a device meta this waits for it)."""
        kind, lane_start, n, s, kv_len = meta[:HEADER].tolist()
        return kind, lane_start, n, s, kv_len

    @staticmethod
    def fields(
        meta: torch.Tensor, n: int, s: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """positions [n, S], keys [n], steps [n], lanes [n], tokens [n, S] or None (views of ``meta``)."""
        rest = meta[HEADER:]
        positions = rest[: n * s].view(n, s)
        keys, steps, lanes = (rest[n * s + i * n : n * s + (i + 1) * n] for i in range(3))
        tokens = rest[n * s + 3 * n : 2 * n * s + 3 * n]
        return positions, keys, steps, lanes, (tokens.view(n, s) if tokens.numel() else None)

    @staticmethod
    def sampling_fields(meta: torch.Tensor, n: int, s: int) -> list[SamplingParams | None] | None:
        """A prefill item's per-request sampling parameters (``meta`` on the host), or None."""
        tail = meta[HEADER + 2 * n * s + 3 * n :]
        return _unpack_sampling(tail, n) if tail.numel() else None

    def to_device(self, meta: torch.Tensor) -> torch.Tensor:
        """One host-to-device copy of an item's metadata; pinned, so the host does not wait for the GPU."""
        if self.device.type != "cuda" or meta.device.type == "cuda":
            return meta.to(self.device)
        return meta.pin_memory().to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(
        self, meta: torch.Tensor, hidden: torch.Tensor | None, tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run one item: returns hidden [n, S, H] for the next stage, or tokens [n] on the last stage.

        Stage 0 passes the decode item's input ``tokens`` [n, 1] (on the device); a prefill item's come
        from the meta."""
        kind, lane_start, n, s, kv_len = self.header(meta)  # stage 0's meta is on the host: no wait
        if self.peers.is_last and kind == PREFILL:
            self.keep_sampling(meta, n, s)
        positions, keys, steps, lanes, prompt = self.fields(self.to_device(meta), n, s)
        if kind in (PREFILL, EXTEND):
            tokens = prompt
        inputs = tokens if self.peers.is_first else hidden
        assert inputs is not None, "stage 0 needs tokens, a later stage the previous stage's hidden state"
        if kind == PREFILL:
            out = self.compiled.prompt(inputs, positions, lanes, prefill=True)
        elif kind == EXTEND:  # a later chunk of one prompt: its keys join those already in the cache
            out = self.compiled.prompt(inputs, positions, lanes, kv_len=kv_len)
        else:
            out = self.compiled.decode(inputs, positions, lanes, kv_len)
        if not self.peers.is_last:
            # why clone: a replayed graph's output is overwritten by the next step while a send may read it
            return out.clone() if kind == DECODE else out
        seen = None
        if self.seen is not None:
            if kind == PREFILL:
                assert prompt is not None
                seen = torch.zeros_like(self.seen[:n])
                # padding (at the scratch position) counts as the first prompt token, already seen
                seen.scatter_(1, torch.where(positions != self.scratch, prompt, prompt[:, :1]), True)
            else:
                seen = self.seen[lane_start : lane_start + n]
                if kind == EXTEND:  # padding, as for a prefill, repeats the chunk's first token
                    assert prompt is not None
                    seen.scatter_(1, torch.where(positions != self.scratch, prompt, prompt[:, :1]), True)
        new = self.sample(out, kind, lane_start, lanes, keys, steps, seen)
        if self.peers.tensor_group is not None:
            # why: every tp rank sampled the same logits; rank 0's tokens make that exact, whatever
            # the reduction order did to the last bit, so the ranks' schedules can never diverge.
            dist.broadcast(new, self.peers.tensor_src, group=self.peers.tensor_group)
        if seen is not None:
            # a lane samples a token it keeps: not idle (scratch), not a prompt chunk before the last (-1)
            active = (positions[:, 0] != self.scratch) & (steps >= 0)
            seen[active] = seen[active].scatter(1, new[active, None], True)
            if kind == PREFILL:
                assert self.seen is not None
                self.seen[lanes] = seen
        return new

    def keep_sampling(self, meta: torch.Tensor, n: int, s: int) -> None:
        """A prefill names each lane's request's sampling parameters (none: the job's for every lane):
        kept until the lane's next prefill."""
        sampling = self.sampling_fields(meta.cpu(), n, s)
        if sampling is None and not self.lane_sampling:
            return  # the usual case: every request samples with the job's parameters
        _, _, _, lanes, _ = self.fields(meta.cpu(), n, s)
        for lane, params in zip(lanes.tolist(), sampling or [None] * n, strict=True):
            if params is None:
                self.lane_sampling.pop(lane, None)
            else:  # the repetition penalty and stop tokens stay the job's
                self.lane_sampling[lane] = replace(
                    self.params,
                    temperature=params.temperature,
                    top_k=params.top_k,
                    top_p=params.top_p,
                    seed=params.seed,
                )

    def sample(
        self,
        logits: torch.Tensor,
        kind: int,
        lane_start: int,
        lanes: torch.Tensor,
        keys: torch.Tensor,
        steps: torch.Tensor,
        seen: torch.Tensor | None,
    ) -> torch.Tensor:
        """Each row with its request's parameters: one call for the job's (the usual case), one per
        distinct set of a request's own."""
        if not self.lane_sampling:
            return sample(logits, self.params, keys, steps, seen)
        rows = range(lane_start, lane_start + len(keys)) if kind == DECODE else lanes.tolist()
        groups: dict[SamplingParams, list[int]] = {}
        for row, lane in enumerate(rows):
            groups.setdefault(self.lane_sampling.get(lane, self.params), []).append(row)
        if len(groups) == 1:
            return sample(logits, next(iter(groups)), keys, steps, seen)
        new = torch.empty(len(keys), dtype=torch.int64, device=logits.device)
        for params, members in groups.items():
            index = torch.tensor(members, device=logits.device)
            new[index] = sample(
                logits[index], params, keys[index], steps[index], None if seen is None else seen[index]
            )
        return new

    def follow(self) -> None:
        """Stages > 0: execute what arrives until the stop item."""
        p = self.peers
        assert p.prev_rank is not None
        hidden_size = self.model.arch.hidden
        while True:
            meta = self.channel.recv_meta(p.prev_rank)  # on the host
            kind, _, n, s, _ = self.header(meta)
            if kind in (STOP, IDLE):
                if p.next_rank is not None:
                    self.channel.send_meta(meta, p.next_rank)
                if kind == STOP:
                    break
                continue
            hidden = self.channel.recv_payload((n, s, hidden_size), p.prev_rank)
            out = self.execute(meta, hidden)
            if p.is_last:
                self.channel.send_payload(out, p.first_rank)
            else:
                assert p.next_rank is not None
                self.channel.send_item(meta, out, p.next_rank)
        self.channel.flush()


def _pack_sampling(sampling: list[SamplingParams | None]) -> torch.Tensor:
    """[5n] int64: given (0/1), temperature, top_k, top_p, seed (the floats as their float64 bits)."""
    rows = [
        (0, 0.0, 0, 1.0, 0) if p is None else (1, p.temperature, p.top_k, p.top_p, p.seed) for p in sampling
    ]
    given, temperature, top_k, top_p, seed = (list(column) for column in zip(*rows, strict=True))
    floats = torch.tensor([*temperature, *top_p], dtype=torch.float64).view(torch.int64)
    return torch.cat([torch.tensor([*given, *top_k, *seed], dtype=torch.int64), floats])


def _unpack_sampling(tail: torch.Tensor, n: int) -> list[SamplingParams | None]:
    given, top_k, seed = (tail[i * n : (i + 1) * n].tolist() for i in range(3))
    floats = tail[3 * n : 5 * n].contiguous().view(torch.float64).tolist()
    temperature, top_p = floats[:n], floats[n:]
    return [
        SamplingParams(temperature=temperature[j], top_k=top_k[j], top_p=top_p[j], seed=seed[j])
        if given[j]
        else None
        for j in range(n)
    ]
