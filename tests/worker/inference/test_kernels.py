"""The Triton decode kernels (skinny_matmul.py, decode_attention.py) against torch: on the CPU through
Triton's interpreter (float32), on a GPU in bfloat16 (skipped without one), and the routing of a
model's linear layers through the measured choice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.worker.inference import kernel_cases

ROOT = Path(__file__).resolve().parents[3]
triton = pytest.importorskip("triton")


def test_kernels_match_torch_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT / 'worker'}{os.pathsep}{ROOT}"}
    run = subprocess.run(
        [sys.executable, "-m", "tests.worker.inference.kernel_cases"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("ok  ") == 14, run.stdout


def test_decode_linear_without_a_choice_is_torch_linear() -> None:
    from conveyor.inference.skinny_matmul import decode_linear

    x, w = torch.randn(2, 1, 8), torch.randn(5, 8)
    torch.testing.assert_close(decode_linear(x, w), torch.nn.functional.linear(x, w), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("cases", [kernel_cases.skinny_errors, kernel_cases.attention_errors])
def test_kernels_match_torch_on_the_gpu(cases) -> None:  # type: ignore[no-untyped-def]
    bad = [(c, e, t) for c, e, t in cases(torch.bfloat16, "cuda") if e > t]
    assert not bad, bad


@pytest.mark.gpu
def test_routed_linears_give_cublas_results_on_the_gpu() -> None:
    from conveyor.inference import skinny_matmul

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024, bias=i == 0) for i in range(8)))
    model = model.to("cuda", torch.bfloat16)
    x = torch.randn(4, 1, 1024, device="cuda", dtype=torch.bfloat16) * 0.1
    with torch.inference_mode():
        ref = model(x)
        weights = skinny_matmul.route_linears(model)
        assert len(weights) == 8
        skinny_matmul.tune(weights, 4)
        chosen = skinny_matmul._CHOICES[(1024, 1024, 4, torch.bfloat16, torch.bfloat16, 0)]
        got = model(x)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2, msg=f"choice {chosen}")
