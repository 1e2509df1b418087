"""fused_norm.py on the CPU: which layers it routes, and its ops' torch forms (what runs where no tile
was chosen). The kernels themselves are checked in test_kernels.py (Triton's interpreter, and a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conveyor.inference import fused_norm
from conveyor.inference import skinny_matmul as sm
from conveyor.inference.families import arch_from_config
from conveyor.inference.model import StageModel
from conveyor.testing.tiny import hf_config


def tiny(family: str) -> StageModel:
    torch.manual_seed(0)
    arch = arch_from_config(hf_config(family))
    model = StageModel(arch, range(arch.layers), first=True, last=True).eval()
    model.setup_cache(2, 16, torch.float32, torch.device("cpu"))
    return model


def test_pre_norm_gated_layers_are_routed_and_others_are_not() -> None:
    assert len(fused_norm.route_blocks(list(tiny("llama").layers))) == 3
    assert fused_norm.route_blocks(list(tiny("gpt2").layers)) == []  # LayerNorm, a plain MLP
    hooked = tiny("llama")
    hooked.layers[1].attn.wo.register_forward_hook(lambda m, i, o: o)  # tensor parallelism's all-reduce
    assert fused_norm.route_blocks(list(hooked.layers)) == []  # all layers or none


def test_nothing_is_routed_off_the_gpu_or_when_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_FUSED_NORMS", "1")
    assert fused_norm.route_norms(tiny("llama")) == []  # CPU weights
    monkeypatch.setenv("CONVEYOR_FUSED_NORMS", "0")
    assert not fused_norm.enabled()


def test_ops_without_a_tile_choice_are_torch() -> None:
    torch.manual_seed(0)
    x, w, residual = torch.randn(3, 1, 16), torch.randn(8, 16), torch.randn(3, 1, 8)
    out, sumsq = fused_norm.decode_linear_residual(x, w, residual)
    torch.testing.assert_close(out, residual + F.linear(x, w), rtol=0, atol=0)
    torch.testing.assert_close(sumsq, out.reshape(3, 8).pow(2).sum(-1)[None])
    norm = tiny("llama").layers[0].attn_norm
    norm.weight.data = torch.rand(32) + 0.5
    h, w2 = torch.randn(3, 1, 32), torch.randn(12, 32)
    parts = torch.stack([c.pow(2).sum(-1).reshape(3) for c in h.chunk(2, dim=-1)])  # two producer tiles
    got = fused_norm.decode_norm_linear(h, parts, norm.weight, norm.eps, w2)
    torch.testing.assert_close(got, F.linear(norm(h), w2))
    gated = fused_norm.decode_norm_linear(h, parts, norm.weight, norm.eps, w2, None, True)
    gate, up = F.linear(norm(h), w2).chunk(2, dim=-1)
    torch.testing.assert_close(gated, F.silu(gate) * up)


def test_a_fused_decode_step_gives_the_plain_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The routed layers' wiring (norm inside the next product, residual and sums of squares handed on
    through the step) through the ops' torch forms: the plain model's logits."""
    model = tiny("llama")
    for layer in model.layers:
        for norm in (layer.attn_norm, layer.mlp_norm):
            norm.weight.data = torch.rand_like(norm.weight) + 0.5
    tokens, positions = torch.tensor([[5], [7]]), torch.tensor([[0], [0]])
    with torch.inference_mode():
        ref = model(tokens, positions, kv_len=4)
        layers = fused_norm.route_blocks(list(model.layers))
        calls = []
        residual = fused_norm.decode_linear_residual
        monkeypatch.setattr(fused_norm, "decode_linear_residual", lambda *a: calls.append(1) or residual(*a))
        monkeypatch.setattr(sm, "is_decode_product", lambda x: True)
        monkeypatch.setitem(fused_norm._PAYS, (2, layers[0].key(torch.float32)), True)
        got = model(tokens, positions, kv_len=4)
    assert len(calls) == 2 * len(model.layers)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
