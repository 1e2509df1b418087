"""The norm of the whole model's gradient, seen from one rank of the 3-D layout.

Every parameter's squares are counted exactly once: a tied weight only on the first stage holding it,
a tensor-parallel shard on every tensor rank (each holds a different part) and summed over the tensor
group, a replicated parameter on each tensor rank alone (its copies are equal), then everything summed
over the pipeline. Replicas hold the same averaged gradients, so one pipeline suffices.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from conveyor.pipe.module import PipelineModule
from conveyor.pipe.sharding import sharded_parameters


def global_grad_norm(module: PipelineModule, device: torch.device, distributed: bool) -> torch.Tensor:
    """The L2 norm of every gradient of the model (collective over the tensor and pipeline groups)."""
    topology = module.topology
    tied_copies = {
        id(p) for key in module.tied_groups if not module.tied_owner(key) for p in module.tied_parameters(key)
    }
    sharded = {id(p) for p in sharded_parameters(module).values()}
    square = torch.zeros(1, dtype=torch.float32, device=device)
    for p in module.parameters():
        if p.grad is not None and id(p) in sharded and id(p) not in tied_copies:
            square += p.grad.detach().float().pow(2).sum()
    if distributed and topology.layout.tensor_parallel > 1:
        # why: each tensor rank holds a different part of a shard's gradient; the norm needs every part
        dist.all_reduce(square, group=topology.tensor_group)
    for p in module.parameters():
        if p.grad is not None and id(p) not in tied_copies and id(p) not in sharded:
            square += p.grad.detach().float().pow(2).sum()
    if distributed and topology.num_stages > 1:
        # why: each stage holds different layers
        dist.all_reduce(square, group=topology.pipe_group)
    return square.sqrt()
