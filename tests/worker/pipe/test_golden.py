"""The golden files under golden/: printed schedule grids and the reference's loss curves. A failure
prints the diff from the golden file and the command that rewrites it (golden.py)."""

from __future__ import annotations

import pytest

from tests.worker.pipe import golden


@pytest.mark.parametrize("schedule,stages,micro_batches", golden.GRID_CASES)
def test_schedule_grid_matches_golden(schedule, stages, micro_batches):
    path = golden.grid_path(schedule, stages, micro_batches)
    expected, got = path.read_text(), golden.grid(schedule, stages, micro_batches)
    assert got == expected, golden.diff(expected, got, path)


def test_reference_loss_curves_match_golden():
    expected_text = golden.LOSS_CURVES.read_text()
    expected, got = golden.parse_curves(expected_text), golden.reference_curves()
    assert list(got) == list(expected), golden.diff(
        expected_text, golden.format_curves(got), golden.LOSS_CURVES
    )
    off = [
        f"{name} step {step}: golden {want:.8f}, now {have:.8f}"
        for name in expected
        for step, (want, have) in enumerate(zip(expected[name], got[name], strict=True))
        if abs(have - want) > golden.LOSS_ATOL + golden.LOSS_RTOL * abs(want)
    ]
    assert not off, (
        "\n".join(off) + "\n" + golden.diff(expected_text, golden.format_curves(got), golden.LOSS_CURVES)
    )
