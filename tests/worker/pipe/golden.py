"""Golden files of the pipeline tests: loss curves of the single-process reference and printed schedule
grids, kept under golden/ and rewritten by ``python tests/worker/pipe/regenerate_golden.py``.

A loss curve pins the numbers the pipelined layouts are compared with (tests/worker/pipe/
test_parallel_vs_reference.py compares them to the same reference, live), so a change of the tiny
models, their data, seeds or optimizer shows up as a diff here rather than moving both sides at once.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from conveyor.pipe.schedule import build_schedule, format_grid

from tests.worker.pipe.models import config, make_data, reference_run
from tests.worker.pipe.scenarios import CASES, MICRO_BATCHES, STEPS

GOLDEN = Path(__file__).parent / "golden"
LOSS_CURVES = GOLDEN / "loss_curves.txt"
REGENERATE = "python tests/worker/pipe/regenerate_golden.py"

# CPU float32: the same machine reproduces the reference bit for bit; another CPU (vector width, BLAS
# kernel) or torch release reorders sums, which after 3 Adam steps moves a loss by well under 1e-5.
LOSS_RTOL = LOSS_ATOL = 1e-5

# (schedule, stages, micro-batches): more micro-batches than stages (1F1B's steady state), as many,
# fewer (warm-up only), and the forward-only order of evaluation.
GRID_CASES = [("1f1b", 2, 3), ("1f1b", 4, 6), ("1f1b", 4, 2), ("gpipe", 3, 2), ("forward", 3, 2)]

# The reference of every case in scenarios.CASES (the schedule does not change it) at one replica (4
# micro-batches a step) and at two (8).
LOSS_CASES = sorted({(model, clip, MICRO_BATCHES * dp) for model, _, clip in CASES for dp in (1, 2)})


def grid_path(schedule: str, stages: int, micro_batches: int) -> Path:
    return GOLDEN / "schedules" / f"{schedule}-stages{stages}-micro{micro_batches}.txt"


def grid(schedule: str, stages: int, micro_batches: int) -> str:
    text = format_grid(build_schedule(schedule, stages, micro_batches))
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def case_name(model: str, clip: float, micro_batches: int) -> str:
    return f"{model}/clip={clip}/micro_batches={micro_batches}"


def reference_curves() -> dict[str, list[float]]:
    """Each LOSS_CASE's per-step losses from the plain nn.Sequential reference."""
    curves = {}
    for model, clip, micro_batches in LOSS_CASES:
        cfg = config(micro_batches, 1, clip=clip)
        losses, _, _ = reference_run(model, cfg, make_data(STEPS, micro_batches))
        curves[case_name(model, clip, micro_batches)] = losses
    return curves


def format_curves(curves: dict[str, list[float]]) -> str:
    lines = [
        "# Per-step losses of the single-process reference (tests/worker/pipe/models.py, reference_run),",
        f"# CPU float32. Compared within rtol={LOSS_RTOL}, atol={LOSS_ATOL}. Regenerate: {REGENERATE}",
        "# case step loss",
    ]
    for name, losses in curves.items():
        lines += [f"{name} {step} {loss:.8f}" for step, loss in enumerate(losses)]
    return "\n".join(lines) + "\n"


def parse_curves(text: str) -> dict[str, list[float]]:
    curves: dict[str, list[float]] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, step, loss = line.split()
        curve = curves.setdefault(name, [])
        assert int(step) == len(curve), f"{LOSS_CURVES.name}: {name} step {step} out of order"
        curve.append(float(loss))
    return curves


def diff(golden: str, got: str, path: Path) -> str:
    """A unified diff from the golden file to what the code produces now, and how to accept it."""
    lines = difflib.unified_diff(
        golden.splitlines(), got.splitlines(), f"{path.name} (golden)", f"{path.name} (now)", lineterm=""
    )
    return "\n".join(lines) + f"\nif the change is intended: {REGENERATE}"
