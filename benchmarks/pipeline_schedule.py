"""Measured pipeline bubble and activation memory of the 1F1B and GPipe schedules.

Each stage is one layer with a fixed cost (it sleeps ``--forward-ms`` in forward and twice that in
backward, so CPU contention does not blur the result) that saves ``--activation-kib`` for backward.
For p in {2, 4} stages and m in {p, 4p} micro-batches it runs p gloo ranks on this machine and reports

* bubble: 1 - (time a stage spent computing) / (batch time), the mean over stages, against the theory
  (p - 1) / (m + p - 1), which is the same for both schedules;
* activation memory: the peak bytes of tensors saved for backward on each stage (tracked with
  saved_tensors_hooks), 1F1B against GPipe.

    python benchmarks/pipeline_schedule.py [--forward-ms 20] [--batches 3] [--json out/bench.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import weakref
from pathlib import Path
from typing import Any

from conveyor.utils import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker"))


def _build(forward_s: float, activation_numel: int) -> Any:
    import torch
    from torch import nn

    class FixedCost(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[override]
            time.sleep(forward_s)
            ctx.save_for_backward(torch.empty(activation_numel))  # the activation this layer keeps
            return x * 1.0

        @staticmethod
        def backward(ctx, grad):  # type: ignore[override]
            (_saved,) = ctx.saved_tensors
            time.sleep(2 * forward_s)
            return grad

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):  # type: ignore[override]
            return FixedCost.apply(x * self.w)

    return Layer


class SavedBytes:
    """Live and peak bytes of tensors autograd saved for backward, while installed."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def hooks(self) -> Any:
        import torch

        def pack(t):
            holder = [t]
            size = t.numel() * t.element_size()
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(holder_box := _Box(holder), self._free, size)
            return holder_box

        def unpack(box):
            return box.value[0]

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def _free(self, size: int) -> None:
        self.live -= size


class _Box:
    def __init__(self, value: Any) -> None:
        self.value = value


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    import conveyor
    from conveyor.pipe import LayerSpec, PipelineModule

    conveyor.init_distributed(backend="gloo", device="cpu", timeout_seconds=120)
    layer = _build(args.forward_ms / 1000, args.activation_kib * 256)
    results = []
    for m in (world, 4 * world):
        for schedule in ("1f1b", "gpipe"):
            net = PipelineModule(
                [LayerSpec(layer) for _ in range(world)],
                num_stages=world,
                loss_fn=lambda y, t: F.mse_loss(y, t),
            )
            cfg = {
                "train_micro_batch_size_per_gpu": 1,
                "gradient_accumulation_steps": m,
                "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
                "pipeline": {"schedule": schedule},
                "steps_per_print": 10**6,
            }
            engine, _, _, _ = conveyor.initialize(model=net, config=cfg)
            item = (torch.ones(1, 4), torch.zeros(1, 4))
            bubbles, peaks = [], []
            for batch in range(args.batches):
                saved = SavedBytes()
                with saved.hooks():
                    engine.train_batch(iter([item] * m))
                stats = engine.last_stats
                if batch > 0:  # the first batch exchanges shapes and warms up
                    bubbles.append(1 - stats["compute_seconds"] / stats["step_seconds"])
                    peaks.append(saved.peak)
            results.append(
                {
                    "p": world,
                    "m": m,
                    "schedule": schedule,
                    "stage": rank,
                    "bubble": sum(bubbles) / len(bubbles),
                    "peak_activation_bytes": max(peaks),
                    "peak_live_micro_batches": stats["peak_live_micro_batches"],
                }
            )
    out.put(results)
    from conveyor.distributed import destroy_distributed

    destroy_distributed()


def run(p: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, p, port, args, out)) for r in range(p)]
    for proc in procs:
        proc.start()
    rows = [row for _ in procs for row in out.get(timeout=600)]
    for proc in procs:
        proc.join()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--forward-ms", type=float, default=20.0)
    parser.add_argument("--activation-kib", type=int, default=256, help="saved for backward per layer call")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = [row for p in (2, 4) for row in run(p, args)]
    print(
        f"{'p':>2} {'m':>3} {'schedule':>8} {'bubble':>8} {'theory':>8} {'peak activations per stage (KiB)':>40}"
    )
    summary = []
    for p in (2, 4):
        for m in (p, 4 * p):
            for schedule in ("1f1b", "gpipe"):
                mine = sorted(
                    (r for r in rows if (r["p"], r["m"], r["schedule"]) == (p, m, schedule)),
                    key=lambda r: r["stage"],
                )
                bubble = sum(r["bubble"] for r in mine) / len(mine)
                theory = (p - 1) / (m + p - 1)
                kib = [r["peak_activation_bytes"] // 1024 for r in mine]
                print(f"{p:>2} {m:>3} {schedule:>8} {bubble:>8.3f} {theory:>8.3f} {str(kib):>40}")
                summary.append(
                    {
                        "p": p,
                        "m": m,
                        "schedule": schedule,
                        "bubble": bubble,
                        "theory": theory,
                        "peak_activation_kib_per_stage": kib,
                    }
                )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
