"""Rewrite the golden files of the pipeline tests (loss curves, schedule grids) from this checkout.

    python tests/worker/pipe/regenerate_golden.py   (from the repository root)

Review the diff before committing it: a golden file changes only when behaviour is meant to change.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def main() -> None:
    # This checkout's code, not whatever conveyor the interpreter has installed (the tests do the same
    # through pyproject's pythonpath).
    sys.path[:0] = [str(ROOT / "worker"), str(ROOT)]
    from tests.worker.pipe import golden

    for schedule, stages, micro_batches in golden.GRID_CASES:
        path = golden.grid_path(schedule, stages, micro_batches)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(golden.grid(schedule, stages, micro_batches))
        print(f"wrote {path.relative_to(ROOT)}")
    golden.LOSS_CURVES.write_text(golden.format_curves(golden.reference_curves()))
    print(f"wrote {golden.LOSS_CURVES.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
