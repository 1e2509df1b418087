"""Rank functions for the multi-process fine-tuning tests (importable by spawned processes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from conveyor.spec import parse_spec
from conveyor.topology import Layout, Topology
from conveyor.train.finetune import fine_tune


def _topology(parsed: Any) -> Topology:
    p = parsed.parallelism
    return Topology(Layout(replicas=p.replicas, stages=p.stages, tensor_parallel=p.tensor_parallel))


def fine_tune_rank(rank: int, world: int, spec: dict[str, Any], checkpoint_dir: str) -> dict[int, float]:
    parsed = parse_spec(spec)
    return fine_tune(parsed, _topology(parsed), torch.device("cpu"), Path(checkpoint_dir)).losses


def fine_tune_outcome_rank(
    rank: int, world: int, spec: dict[str, Any], checkpoint_dir: str, stop_after: int = 0
) -> tuple[dict[int, float], dict[int, float | None], int]:
    """(losses, gradient norms, step resumed from); ``stop_after`` > 0: every rank dies after that step
    (an exception on all of them at once, as a killed job stops), its checkpoints left behind."""
    parsed = parse_spec(spec)

    def stop(step: int, _loss: float) -> None:
        if step == stop_after:
            raise SystemExit(f"stopped after step {step}")

    outcome = fine_tune(
        parsed,
        _topology(parsed),
        torch.device("cpu"),
        Path(checkpoint_dir),
        on_step=stop if stop_after else None,
    )
    return outcome.losses, outcome.grad_norms, outcome.resumed_from


def tensor_parallel_gradients_rank(
    rank: int, world: int, model_dir: str, ids: torch.Tensor
) -> tuple[float, dict[str, float], float, dict[str, torch.Tensor], dict[str, torch.Tensor], tuple[int, ...]]:
    """One forward and backward of the whole model split over ``world`` tensor ranks (one stage):
    (loss, replicated gradients' gaps across the tensor group, the global gradient norm, the weights and
    the gradients gathered whole under their HF names, the shape of the logits this rank holds)."""
    import functools

    from conveyor.inference.model.families import load_arch
    from conveyor.inference.model.loader import Checkpoint
    from conveyor.pipe.grad_norm import global_grad_norm
    from conveyor.train.export import hf_state
    from conveyor.train.finetune import build_stage
    from conveyor.train.tensor_parallel import gather_block, replicated_gradient_gaps
    from conveyor.train.vocab_parallel import gather_rows, vocab_parallel

    arch = load_arch(model_dir)
    topology = Topology(Layout(tensor_parallel=world))
    assert topology.tensor_group is not None
    module, roles = build_stage(arch, topology, model_dir, torch.device("cpu"))
    logits = module(ids)
    assert module.loss_fn is not None
    loss = module.loss_fn(logits, ids)  # vocabulary-parallel: on this rank's logits
    loss.backward()
    gaps = replicated_gradient_gaps(module, topology.tensor_group)
    norm = float(global_grad_norm(module, torch.device("cpu"), distributed=True))
    source = Checkpoint(model_dir)
    names = source.names()
    source.close()
    whole = functools.partial(gather_block, arch=arch, group=topology.tensor_group)
    rows = (
        functools.partial(gather_rows, group=topology.tensor_group) if vocab_parallel(arch, world) else None
    )
    weights = {
        n: t.clone() for n, t in hf_state(module, roles, arch, torch.float32, names, whole, rows).items()
    }
    with torch.no_grad():  # the gradients, exported as if they were the weights: under HF's names, whole
        for p in module.parameters():
            assert p.grad is not None
            p.copy_(p.grad)
    grads = hf_state(module, roles, arch, torch.float32, names, whole, rows)
    return float(loss.detach()), gaps, norm, weights, grads, tuple(logits.shape)
