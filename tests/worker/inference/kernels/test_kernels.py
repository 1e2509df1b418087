"""The Triton kernels (skinny_matmul.py, decode_attention.py, elementwise.py) against torch: on the CPU through
Triton's interpreter (float32), on a GPU in bfloat16 (skipped without one), and the routing of a
model's linear layers through the measured choice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton  # noqa: F401  (torch's Linux wheels depend on it: its absence is a broken install, not a skip)

from tests.worker.inference.kernels import kernel_cases

ROOT = Path(__file__).resolve().parents[4]


def test_kernels_match_torch_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT / 'worker'}{os.pathsep}{ROOT}"}
    run = subprocess.run(
        [sys.executable, "-m", "tests.worker.inference.kernels.kernel_cases"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("ok  ") == 60, run.stdout


def test_decode_linear_without_a_choice_is_torch_linear() -> None:
    from conveyor.inference.kernels.skinny_matmul import decode_linear

    x, w = torch.randn(2, 1, 8), torch.randn(5, 8)
    torch.testing.assert_close(decode_linear(x, w), torch.nn.functional.linear(x, w), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "cases",
    [
        kernel_cases.skinny_errors,
        kernel_cases.op_errors,
        kernel_cases.attention_errors,
        kernel_cases.elementwise_errors,
    ],
)
def test_kernels_match_torch_on_the_gpu(cases) -> None:  # type: ignore[no-untyped-def]
    bad = [(c, e, t) for c, e, t in cases(torch.bfloat16, "cuda") if e > t]
    assert not bad, bad


@pytest.mark.gpu
def test_decode_attention_reads_a_float8_cache_on_the_gpu() -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability 8.9 (Ada, Hopper) or newer")
    cases = kernel_cases.attention_errors(torch.bfloat16, "cuda", torch.float8_e4m3fn)
    assert len(cases) == 4
    bad = [(c, e, t) for c, e, t in cases if e > t]
    assert not bad, bad


@pytest.mark.gpu
def test_routed_linears_give_cublas_results_on_the_gpu() -> None:
    from conveyor.inference.kernels import skinny_matmul

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024, bias=i == 0) for i in range(8)))
    model = model.to("cuda", torch.bfloat16)
    x = torch.randn(4, 1, 1024, device="cuda", dtype=torch.bfloat16) * 0.1
    with torch.inference_mode():
        ref = model(x)
        weights = skinny_matmul.route_linears(model)
        assert len(weights) == 8
        skinny_matmul.tune(weights, 4)
        chosen = skinny_matmul._CHOICES[(1024, 1024, 4, torch.bfloat16, torch.bfloat16, 0, False)]
        got = model(x)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2, msg=f"choice {chosen}")


@pytest.mark.gpu
def test_split_k_product_replays_in_a_cuda_graph_on_the_gpu() -> None:
    """A product split along K, captured in a CUDA graph and replayed: the same result every replay (the
    arrival counters are left at zero) and cuBLAS's within rounding."""
    from conveyor.inference.kernels import skinny_matmul

    torch.manual_seed(0)
    linear = torch.nn.Linear(4096, 1024, bias=False).to("cuda", torch.bfloat16)
    x = torch.randn(16, 1, 4096, device="cuda", dtype=torch.bfloat16)
    key = (1024, 4096, 16, torch.bfloat16, torch.bfloat16, 0, False)
    with torch.inference_mode():
        ref = linear(x)
        skinny_matmul.route_linears(linear)
        skinny_matmul._CHOICES[key] = skinny_matmul.Tiles(32, 128, splits=4)
        try:
            linear(x)  # warm-up: compiles the kernel
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = linear(x)
            results = []
            for _ in range(3):
                graph.replay()
                results.append(out.clone())
        finally:
            del skinny_matmul._CHOICES[key]
    for got in results:
        torch.testing.assert_close(got, results[0], rtol=0, atol=0)
    torch.testing.assert_close(results[0], ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_gate_up_applies_the_gate_on_the_gpu(int8: bool, fused: bool) -> None:
    """Routed, a silu-gated MLP's gate | up layer returns silu(gate) * up itself, fused in the kernel or
    after the product as tune chose, eager and compiled: the unrouted MLP's output, at decode and at
    prefill."""
    from conveyor.inference.kernels import skinny_matmul
    from conveyor.inference.model.families import arch_from_config
    from conveyor.inference.model.stage_model import MLP
    from conveyor.inference.pipeline.quantize import Int8Linear
    from transformers import LlamaConfig

    arch = arch_from_config(
        LlamaConfig(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_hidden_layers=1)
    )
    torch.manual_seed(0)
    mlps = torch.nn.Sequential(*(MLP(arch) for _ in range(4))).to("cuda", torch.bfloat16)
    if int8:
        for mlp in mlps:
            mlp.w_in = Int8Linear.from_linear(mlp.w_in)
    decode = torch.randn(3, 1, 512, device="cuda", dtype=torch.bfloat16)
    prefill = torch.randn(2, 100, 512, device="cuda", dtype=torch.bfloat16)
    weight = mlps[0].w_in.weight
    key = (2 * 1376, 512, 3, torch.bfloat16, weight.dtype, 0, True)
    with torch.inference_mode():
        ref_decode, ref_prefill = mlps(decode), mlps(prefill)
        skinny_matmul.route_linears(mlps)
        products = skinny_matmul.route_linears(mlps)  # twice (a second decode step on the model): gated once
        assert [p.gate_up for p in products].count(True) == 4 and all(m.up_applies_gate for m in mlps)
        skinny_matmul.tune(products, 3)
        saved = skinny_matmul._CHOICES[key]
        skinny_matmul._CHOICES[key] = skinny_matmul.Tiles(16, 128) if fused else None
        torch._dynamo.reset()
        try:
            torch.testing.assert_close(mlps(decode), ref_decode, rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(torch.compile(mlps)(decode), ref_decode, rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(mlps(prefill), ref_prefill, rtol=0, atol=0)
        finally:
            skinny_matmul._CHOICES[key] = saved
            torch._dynamo.reset()
