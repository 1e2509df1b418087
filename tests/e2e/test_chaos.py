"""Chaos, counted, small: the seeded fault loop of tests/e2e/chaos.py with two of each fault (worker kills,
pod deletions, operator kills) on the real engine, an inference job (2 stages x TP 2) and a fine-tuning
job (2 stages, checkpoints). The outputs equal a clean run's bit for bit, the restarts in status equal the
restarting faults injected, and nothing of the job is left behind. The full count (20 of each) is run from
the CLI (`python -m tests.e2e.chaos`); its numbers are in docs/operating.md."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from tests.e2e.chaos import run_chaos

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]


@pytest.mark.parametrize("job,seed", [("inference", 11), ("train", 12)])
def test_a_seeded_fault_loop_changes_no_output_and_every_restart_is_counted(
    k8s_cluster, k8s_namespace, operator, tmp_path, job, seed
):
    report = run_chaos(
        k8s_cluster, k8s_namespace, operator, job, seed, 2, 2, 2, tmp_path / "work", timeout=900
    )
    print(report.summary())
    detail = json.dumps(asdict(report), indent=1, default=str)
    assert report.injected["worker-kill"] + report.injected["pod-delete"] >= 1, (
        detail
    )  # faults landed mid-run
    assert report.injected["operator-kill"] >= 1, detail
    assert report.identical, detail
    assert report.restarts == report.budget_restarts == report.expected_restarts, detail
    assert not report.orphans, detail
