"""A DeepSpeed tutorial's training loop on a plain model (changed only in its import), for the
data-parallel engine's tests, and the single-process reference it is compared with."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

STEPS, MICRO, ACCUMULATION, SAMPLES = 6, 2, 2, 48
CONFIG = {
    "train_micro_batch_size_per_gpu": MICRO,
    "gradient_accumulation_steps": ACCUMULATION,
    "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.01}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 0.01, "warmup_num_steps": 3}},
    "gradient_clipping": 0.5,
    "steps_per_print": 1,
}


def make_model() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(5)
    return torch.utils.data.TensorDataset(
        torch.randn(SAMPLES, 8, generator=g), torch.randn(SAMPLES, 4, generator=g)
    )


def tutorial_loop(engine: Any, loader: Any, steps: int) -> list[float]:
    """The loop of DeepSpeed's getting-started tutorial; returns this rank's loss per optimizer step."""
    criterion = nn.MSELoss()
    losses: list[float] = []
    micro: list[float] = []
    data = iter(loader)
    while engine.global_steps < steps:
        x, y = next(data)
        loss = criterion(engine(x.to(engine.device)), y.to(engine.device))
        engine.backward(loss)
        micro.append(float(loss.detach()))
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        if boundary:
            losses.append(sum(micro) / len(micro))
            micro = []
    return losses


def rank_main(rank: int, world: int, workdir: str) -> dict[str, Any]:
    import conveyor

    config_file = Path(workdir) / "ds_config.json"
    if rank == 0:
        config_file.write_text(json.dumps(CONFIG))
    torch.distributed.barrier()
    net = make_model()
    engine, _, loader, _ = conveyor.initialize(
        model=net, model_parameters=net.parameters(), training_data=dataset(), config=str(config_file)
    )
    first = tutorial_loop(engine, loader, STEPS // 2)
    engine.save_checkpoint(Path(workdir) / "ckpt", client_state={"epoch": 1})
    rest = tutorial_loop(engine, _skip(loader, STEPS // 2), STEPS)
    weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}

    # A new process would start here: the same script, config given as config_params, resumes from latest.
    again = make_model()
    resumed, _, loader2, _ = conveyor.initialize(
        model=again, model_parameters=again.parameters(), training_data=dataset(), config_params=CONFIG
    )
    path, client = resumed.load_checkpoint(Path(workdir) / "ckpt")
    after = tutorial_loop(resumed, _skip(loader2, STEPS // 2), STEPS)
    return {"losses": first + rest, "weights": weights, "resumed": after, "client": client, "path": str(path)}


def _skip(loader: Any, steps: int) -> Any:
    """The loader from where ``steps`` optimizer steps of micro-batches left it."""
    items = iter(loader)
    for _ in range(steps * ACCUMULATION):
        next(items)
    return items


def reference(world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, the same model deep-copied: each step's gradient is the mean over every rank's
    micro-batches (DistributedSampler without shuffle gives rank r samples r, r + world, ...)."""
    model = copy.deepcopy(make_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    import math

    warm = lambda step: math.log(step + 1) / math.log(3) if step < 3 else 1.0  # noqa: E731 (WarmupLR, log)
    for group in optimizer.param_groups:
        group["lr"] = 0.01 * warm(0)
    data = dataset()
    per_rank = [list(range(r, SAMPLES, world)) for r in range(world)]
    losses = []
    for step in range(STEPS):
        total = 0.0
        for r in range(world):
            for m in range(ACCUMULATION):
                start = (step * ACCUMULATION + m) * MICRO
                x, y = data[per_rank[r][start : start + MICRO]]
                loss = nn.MSELoss()(model(x), y)
                (loss / (ACCUMULATION * world)).backward()
                total += float(loss.detach()) / (ACCUMULATION * world)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:
            # DeepSpeed's schedule: step k runs at iteration k - 1 (the first two at 0)
            group["lr"] = 0.01 * warm(step)
        losses.append(total)
    return losses, {k: v.detach() for k, v in model.state_dict().items()}
