"""benchmarks/train_pipeline.py on the CPU: our side is a real ``mode: train`` job through ``conveyor run``
(tiny Llama, 2 stages over gloo), stopped after its timed steps as on the GPU; DeepSpeed's side runs where
``deepspeed`` is importable (then its first loss is ours: the same weights and samples) and is reported
as skipped where not. Without enough GPUs the GPU run says
so and exits 0."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, subprocess_env

SCRIPT = str(ROOT / "benchmarks" / "train_pipeline.py")


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, SCRIPT, *args],
        env=subprocess_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.integration
def test_smoke_run_reports_tokens_per_second_of_our_job(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    _run("--device", "cpu", "--stages", "2", "--seq-length", "32", "--global-batch-size", "4",
         "--warmup-steps", "1", "--steps", "2", "--stop-after-steps", "--timeout", "200",
         "--workdir", str(tmp_path / "work"), "--out", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    assert report["shape"] == "tiny" and report["gpus"] == 2 and report["micro_batches"] == 4
    assert report["tokens_per_step"] == 4 * 32 and report["parameters"] > 0
    ours = report["conveyor"]
    assert ours["status"] == "ok", ours["status"]
    assert ours["stopped_after_steps"]  # as on the GPU: no end-of-run checkpoint
    assert not (tmp_path / "work" / "conveyor" / "ckpt").exists()
    assert len(ours["step_seconds"]) == 2 and ours["tokens_per_s"] > 0
    assert ours["tokens_per_s"] == pytest.approx(
        4 * 32 / ours["mean_step_s"], rel=1e-2
    )  # mean_step_s is rounded
    assert ours["mfu"] is None  # no peak FLOP/s on the CPU: not guessed
    # a random model's first loss is about ln(vocabulary)
    assert len(ours["losses"]) >= 3 and abs(ours["losses"][0] - math.log(256)) < 1.5, ours["losses"]
    assert "| conveyor | 2 stages x 1 tensor-parallel |" in report["table"]
    theirs = report["deepspeed"]
    if importlib.util.find_spec("deepspeed") is None:
        assert theirs == {"status": "skipped: deepspeed not importable"}
        assert "tokens_per_s_ratio_conveyor_over_deepspeed" not in report
    else:
        assert theirs["status"] == "ok" and theirs["tokens_per_s"] > 0, theirs["status"]
        assert report["tokens_per_s_ratio_conveyor_over_deepspeed"] > 0
        # the same weights and samples in the same order, fp32: the same first loss
        assert report["loss_step1"]["rel_diff"] < 1e-5, report["loss_step1"]


def test_without_enough_gpus_it_says_so_and_exits_cleanly(tmp_path: Path) -> None:
    import torch

    if torch.cuda.device_count() >= 64:
        pytest.skip("this machine has the GPUs")
    out = tmp_path / "skipped.json"
    proc = _run("--device", "cuda", "--stages", "8", "--tensor-parallel", "8", "--out", str(out), timeout=60)
    assert "need 64 GPUs" in proc.stderr
    assert json.loads(out.read_text())["status"].startswith(
        "skipped: 8 stages x 8 tensor-parallel need 64 GPUs"
    )


def test_summary_counts_tokens_per_second_and_mfu_from_the_mean_step() -> None:
    from benchmarks.train_pipeline import summary

    # 4096 tokens a step at a mean 2 s: 2048 tokens/s; on 2 GPUs of 1e13 FLOP/s peak (MFU to 4 places)
    row = summary([1.0, 3.0], 4096, flops_per_token=1e9, params=10**8, peak=1e13, gpus=2)
    assert row["mean_step_s"] == 2.0 and row["tokens_per_s"] == 2048.0
    assert row["mfu"] == pytest.approx(2048 * 1e9 / 2e13, abs=1e-4)
    assert row["mfu_6n"] == pytest.approx(2048 * 6e8 / 2e13, abs=1e-4)
    assert summary([1.0], 10, 1.0, 1, None, 1)["mfu"] is None
