"""Decode attention: the eager (matmul) and compiled (multiply-sum) forms equal masked SDPA, with GQA."""

import pytest
import torch
import torch.nn.functional as F
from conveyor.inference.model.stage_model import decode_attention


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_decode_attention_matches_sdpa(heads: int, kv_heads: int) -> None:
    torch.manual_seed(0)
    n, d, length = 3, 16, 11
    q = torch.randn(n, heads, 1, d, dtype=torch.float64)
    k = torch.randn(n, kv_heads, length, d, dtype=torch.float64)
    v = torch.randn(n, kv_heads, length, d, dtype=torch.float64)
    positions = torch.tensor([[0], [4], [10]])  # lane 0 sees one key, lane 2 all of them
    mask = torch.arange(length)[None, None, None, :] <= positions[:, None, :, None]  # [n, 1, 1, L]
    scale = d**-0.5
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=kv_heads != heads)
    eager = decode_attention(q, k, v, mask, scale)
    torch.testing.assert_close(eager, want, rtol=1e-6, atol=1e-6)

    # The compiled form (taken only while dynamo traces); aot_eager needs no C compiler.
    compiled = torch.compile(decode_attention, backend="aot_eager", fullgraph=True)(q, k, v, mask, scale)
    torch.testing.assert_close(compiled, want, rtol=1e-6, atol=1e-6)
