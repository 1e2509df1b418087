"""Detection and refusal in one process: which linears the traced dataflow makes column- or row-parallel,
and a TP size that does not divide the heads refused (naming the family, the shape and the size) before
any weight moves."""

from __future__ import annotations

import conveyor
import pytest
import torch
from conveyor.autotp import AutoTPError, plan_model
from conveyor.autotp.shard import shard_model
from torch import nn

from tests.worker.autotp.families import build, prompt


def _roles(family: str, tp: int = 2) -> dict[str, str]:
    model, _ = build(family)
    return {n: lp.role for n, lp in plan_model(model, tp).linears.items()}


def test_llama_gqa_roles() -> None:
    roles = _roles("llama")
    layer = "model.layers.0"
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert roles[f"{layer}.{name}"] == "column", name
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        assert roles[f"{layer}.{name}"] == "row", name
    assert "lm_head" not in roles  # planned with the embeddings (vocabulary-parallel)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_a_norm_of_each_head_does_not_hide_its_projection(family: str) -> None:
    """Qwen3's and Gemma 3's q_norm / k_norm (over head_dim, one weight for every head) sit between q/k_proj
    and the attention. Before: read as the residual stream's norms, they left q and k whole while v was
    split, and the split model's forward failed ("mat1 and mat2 shapes cannot be multiplied")."""
    roles = _roles(family)
    for name in ("q_proj", "k_proj", "v_proj"):
        assert roles[f"model.layers.0.self_attn.{name}"] == "column", name
    assert roles["model.layers.0.self_attn.o_proj"] == "row"


@pytest.mark.parametrize("family", ["olmo2", "olmoe"])
def test_a_norm_over_a_whole_projection_keeps_the_attention_whole(family: str) -> None:
    """OLMo 2 and OLMoE normalize the whole q and k projections (every head at once): no split by heads
    keeps that norm's result, so the attention stays whole on every rank, its head counts undivided, and
    the MLP or experts beside it are split (before: the whole model was refused, OLMoE's experts included;
    first of all, the split model's forward crashed)."""
    model, _ = build(family)
    plan = plan_model(model, 2)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert plan.linears[f"model.layers.0.self_attn.{name}"].role == "replicated", name
    assert plan.heads == []
    assert "model.layers.0.self_attn" in plan.kept_whole
    assert "2 attention modules kept whole (e.g. model.layers.0.self_attn: k_proj, q_proj" in plan.describe()
    if family == "olmo2":
        assert plan.linears["model.layers.0.mlp.down_proj"].role == "row"
    else:
        assert [e.name for e in plan.experts] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


def test_phi3_fused_qkv_split_per_head_group_and_gate_up_per_half() -> None:
    """Phi-3's attention reads its fused q|k|v at offsets computed from the config
    (``qkv[..., :query_pos]``, ``query_pos = config.num_attention_heads * head_dim``): before, q|k|v and
    o_proj stayed whole on every rank (a third of each layer here). Now q, k and v are each split by heads
    and the attention gets its own config counting the rank's heads; the model's config is untouched.
    Its MLP chunks the fused gate|up with ``chunk(2, dim=-1)`` (autograd reads the dim back as 2**64 - 1):
    each half is split, not the whole (rank 0 all of gate, rank 1 all of up: logits 18% off)."""
    model, _ = build("phi3")
    plan = plan_model(model, 2)
    qkv = plan.linears["model.layers.0.self_attn.qkv_proj"]
    assert qkv.role == "column" and qkv.split is not None and qkv.split.blocks == (64, 32, 32)  # q | k | v
    # rank 1: q heads 4-7, then k heads 2-3 and v heads 2-3 (8 wide each)
    assert qkv.split.index(1, 2).tolist() == [*range(32, 64), *range(80, 96), *range(112, 128)]
    assert plan.linears["model.layers.0.self_attn.o_proj"].role == "row"
    gate_up = plan.linears["model.layers.0.mlp.gate_up_proj"]
    assert gate_up.role == "column" and gate_up.split is not None and gate_up.split.blocks == (128, 128)
    assert plan.linears["model.layers.0.mlp.down_proj"].role == "row"
    attention = next(h for h in plan.heads if h.name == "model.layers.0.self_attn")
    assert attention.config_attrs == {"num_attention_heads": 8, "num_key_value_heads": 4}
    shard_model(model, plan, rank=1, group=None)
    attn = model.model.layers[0].self_attn
    assert (attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.num_key_value_heads) == (
        4,
        2,
        2,
    )
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (8, 4)
    assert attn.config is not model.model.layers[1].self_attn.config


def test_phi3_heads_the_split_does_not_divide_are_refused() -> None:
    """q, k and v are each split by whole heads: 4 KV heads over TP 8 is refused by name, not miscomputed."""
    model, _ = build("phi3")
    with pytest.raises(
        AutoTPError, match=r"qkv_proj \(column-parallel\): 4 heads of width 8 cannot be split 8 ways"
    ):
        plan_model(model, 8)


def test_glm_fused_gate_up_split_per_half() -> None:
    """GLM chunks its gate|up as Phi-3 does (``chunk(2, dim=-1)``): before, split contiguously, its TP-2
    logits were 20% off the single-process model's, with no error."""
    import transformers as T

    config = T.GlmConfig(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8, intermediate_size=128,
        num_hidden_layers=1, vocab_size=96, pad_token_id=0,
    )  # fmt: skip
    plan = plan_model(T.GlmForCausalLM(config).eval(), 2)
    gate_up = plan.linears["model.layers.0.mlp.gate_up_proj"]
    assert gate_up.role == "column" and gate_up.split is not None and gate_up.split.blocks == (128, 128)
    assert plan.linears["model.layers.0.self_attn.q_proj"].role == "column"


def test_dbrx_fused_qkv_clamped_before_its_split() -> None:
    """DBRX clamps its fused q|k|v (``clip_qkv``) and then splits it: before, the split behind the clamp
    went unseen, Wqkv was cut as one block (rank 0 all of q) and TP-2 logits were 140% off, no error."""
    model, _ = build("dbrx")
    plan = plan_model(model, 2)
    wqkv = plan.linears["transformer.blocks.0.norm_attn_norm.attn.Wqkv"]
    assert wqkv.role == "column" and wqkv.split is not None and wqkv.split.blocks == (64, 32, 32)
    assert plan.linears["transformer.blocks.0.norm_attn_norm.attn.out_proj"].role == "row"


def test_gpt_oss_attention_sinks_split_by_heads() -> None:
    """GPT-OSS's attention holds one sink logit per query head: before, kept whole while the heads were
    split, its attention died concatenating 8 sinks to 4 heads' scores."""
    model, _ = build("gpt_oss")
    plan = plan_model(model, 2)
    attention = next(h for h in plan.heads if h.name == "model.layers.0.self_attn")
    assert set(attention.head_params) == {"sinks"}
    dim, split = attention.head_params["sinks"]
    assert dim == 0 and split.index(1, 2).tolist() == [4, 5, 6, 7]
    full = model.model.layers[0].self_attn.sinks.detach().clone()
    shard_model(model, plan, rank=1, group=None)
    assert torch.equal(model.model.layers[0].self_attn.sinks, full[4:])


def test_funnel_head_count_and_per_head_parameters_split() -> None:
    """Funnel's attention reads its head count from the config and holds per-head parameters on dim 0
    or 1 (r_kernel [d_model, heads, d_head]): before, its q was split and the view by config.n_head
    failed. Rank 1 keeps heads 4..7 of each, and its own config counts 4 heads."""
    model, _ = build("funnel")
    plan = plan_model(model, 2)
    attention = next(h for h in plan.heads if h.name.endswith("layers.0.attention"))
    assert attention.config_attrs == {"n_head": 8}
    assert {n: d for n, (d, _) in attention.head_params.items()} == {
        "r_w_bias": 0,
        "r_r_bias": 0,
        "r_s_bias": 0,
        "r_kernel": 1,
        "seg_embed": 1,
    }
    module = model.get_submodule(attention.name)
    kernel = module.r_kernel.detach().clone()
    shard_model(model, plan, rank=1, group=None)
    assert torch.equal(module.r_kernel, kernel[:, 4:]) and module.config.n_head == 4
    assert model.config.n_head == 8  # the model's config (and the other layers') untouched


def test_modernbert_fused_qkv_split_per_block() -> None:
    """ModernBERT reads its fused Wqkv as ``view(..., 3, heads, head_dim)``: before, cut as one block
    (rank 0 all of q) its TP-2 outputs were 117% off the single-process model's, with no error."""
    model, _ = build("modernbert")
    plan = plan_model(model, 2)
    wqkv = plan.linears["model.layers.0.attn.Wqkv"]
    assert wqkv.role == "column" and wqkv.split is not None and wqkv.split.blocks == (64, 64, 64)
    assert plan.linears["model.layers.0.attn.Wo"].role == "row"


def test_diffllama_heads_split_per_half() -> None:
    """DiffLlama pairs head i with head i + heads/2 (and value head j with j + kv_heads/2): before, q, k
    and v were split contiguously, rank 0 paired its heads among themselves and TP-2 logits were 165%
    off, with no error. Each half is split now, so a rank keeps both heads of its pairs; its
    head_dim-wide lambdas (as many values as heads here) stay whole."""
    model, _ = build("diffllama")
    plan = plan_model(model, 2)
    for proj in ("q_proj", "k_proj", "v_proj"):
        split = plan.linears[f"model.layers.0.self_attn.{proj}"].split
        assert split is not None and (split.blocks, split.groups) == ((32,), 2)
        # rank 1: heads 2-3 of the first half and 6-7 of the second (8 wide each)
        assert split.index(1, 2).tolist() == [*range(16, 32), *range(48, 64)]
    o_proj = plan.linears["model.layers.0.self_attn.o_proj"]
    assert o_proj.role == "row" and o_proj.split is not None and o_proj.split.groups == 1
    attention = next(h for h in plan.heads if h.name == "model.layers.0.self_attn")
    assert attention.head_params == {}


def test_gpt2_conv1d_fused_qkv() -> None:
    model, _ = build("gpt2")
    plan = plan_model(model, 2)
    attn = plan.linears["transformer.h.0.attn.c_attn"]
    assert attn.role == "column"
    assert attn.split is not None and attn.split.blocks == (64, 64, 64)  # q | k | v, each split by heads
    assert plan.linears["transformer.h.0.attn.c_proj"].role == "row"
    assert plan.linears["transformer.h.0.mlp.c_fc"].role == "column"
    assert plan.linears["transformer.h.0.mlp.c_proj"].role == "row"
    assert plan.vocab is not None and plan.vocab.tied and plan.vocab.parallel


def test_t5_relative_bias_split_by_heads() -> None:
    model, _ = build("t5")
    plan = plan_model(model, 2)
    embs = [e for h in plan.heads for e in h.head_embeddings]
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias" in embs
    assert plan.linears["decoder.block.0.layer.1.EncDecAttention.o"].role == "row"  # cross-attention


def test_moe_experts_planned() -> None:
    model, _ = build("mixtral")
    plan = plan_model(model, 2)
    assert [e.name for e in plan.experts] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    router = plan.linears.get("model.layers.0.mlp.gate")  # a top-k router module, or a plain Linear
    assert router is None or router.role == "replicated"  # it reads the full stream and stays whole


def test_refused_before_any_weight_moves() -> None:
    model, _ = build("llama")  # 8 query heads, 4 key/value heads
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AutoTPError) as err:
        conveyor.init_inference(model, tensor_parallel={"tp_size": 3})
    message = str(err.value)
    assert "LlamaForCausalLM" in message and "'llama'" in message
    assert "tensor-parallel size 3" in message
    assert "num_attention_heads = 8" in message and "num_key_value_heads = 4" in message
    assert "Tensor-parallel sizes that divide this model: [1, 2, 4]" in message
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_tp_size_8_refused_for_4_kv_heads() -> None:
    model, _ = build("llama")
    with pytest.raises(AutoTPError, match="num_key_value_heads = 4 is not divisible by 8"):
        plan_model(model, 8)


def test_not_an_hf_model_refused() -> None:
    with pytest.raises(AutoTPError, match="PreTrainedModel"):
        conveyor.init_inference(nn.Linear(4, 4), tensor_parallel={"tp_size": 2})


def test_unsupported_options_refused() -> None:
    model, _ = build("gpt2")
    with pytest.raises(AutoTPError, match="injection_policy"):
        conveyor.init_inference(
            model, tensor_parallel={"tp_size": 1}, injection_policy={"GPT2Block": ("c_proj",)}
        )
    with pytest.raises(AutoTPError, match="unknown keys"):
        conveyor.init_inference(model, tensor_parallel={"tp_sise": 2})


def test_tp1_leaves_the_model_whole() -> None:
    model, _ = build("gpt2")
    ids = prompt()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        engine = conveyor.init_inference(model, tensor_parallel={"tp_size": 1}, dtype=torch.float32)
        assert torch.equal(engine(input_ids=ids).logits, ref)


def test_unplaceable_experts_refused() -> None:
    # 2 x 32 (fused gate|up) == hidden 64: the 3D weights no longer show which is up and which down
    model, _ = build("qwen2_moe", moe_intermediate_size=32)
    with pytest.raises(AutoTPError) as err:
        plan_model(model, 2)
    message = str(err.value)
    assert "Qwen2MoeForCausalLM" in message and "model.layers.0.mlp.experts" in message
    assert "which is up and which down" in message


def test_falcon_multi_query_refused() -> None:
    # the old Falcon architecture with one shared key/value head: nothing to split it by
    model, _ = build("falcon", new_decoder_architecture=False, multi_query=True, num_kv_heads=None)
    with pytest.raises(
        AutoTPError, match=r"self_attention.num_kv_heads = 1 is not divisible by 2.*sizes .* \[1\]"
    ):
        plan_model(model, 2)


def test_max_out_tokens_checked() -> None:
    model, _ = build("gpt2")
    engine = conveyor.init_inference(model, tensor_parallel={"tp_size": 1}, max_out_tokens=10)
    with pytest.raises(ValueError, match="exceeds max_out_tokens"):
        engine.generate(prompt(), max_new_tokens=4)  # 7 prompt tokens + 4


def test_vocabulary_no_tp_divides_stays_replicated() -> None:
    model, _ = build("gpt2_odd_vocab")  # 97 tokens
    plan = plan_model(model, 2)
    assert plan.vocab is not None and plan.vocab.tied and not plan.vocab.parallel


def test_lm_head_read_as_a_weight_keeps_the_vocabulary_whole() -> None:
    """MobileBERT's LM head is never called (its weight is joined with another matrix and multiplied
    directly): a vocabulary slice there would have no all-gather after it (before: the split crashed on
    the concatenation's shapes). BERT's, called, stays vocabulary-parallel."""
    assert plan_model(build("mobilebert")[0], 2).vocab.parallel is False  # type: ignore[union-attr]
    assert plan_model(build("bert")[0], 2).vocab.parallel is True  # type: ignore[union-attr]


@pytest.mark.parametrize("kernel_inject", [False, True])
def test_dtype_checked_before_any_weight_moves(kernel_inject: bool) -> None:
    """``dtype=torch.int8`` (DeepSpeed's quantized kernels) is refused by name with the model untouched;
    before, it failed inside ``model.to`` ("nn.Module.to only accepts floating point ..."), on the AutoTP
    path after the model was sharded in place. DeepSpeed's dtype names ("fp16", ...) are accepted too
    (before: "Invalid device string: 'fp16'")."""
    model, _ = build("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(
        AutoTPError, match=r"dtype=torch.int8 is not supported: init_inference takes torch.float32"
    ):
        conveyor.init_inference(
            model, tensor_parallel=1, dtype=torch.int8, replace_with_kernel_inject=kernel_inject
        )
    after = dict(model.named_parameters())
    assert all(not after[n].is_meta and torch.equal(after[n], p) for n, p in before.items())
    engine = conveyor.init_inference(
        model, tensor_parallel=1, dtype="fp16", replace_with_kernel_inject=kernel_inject
    )
    assert next(engine.module.parameters()).dtype == torch.float16


def test_jetmoe_refused_by_name() -> None:
    """JetMoE's experts (its MLP's and its mixture of attention heads') are one module per projection called
    with per-expert token counts: refused naming the family and why, before any weight moves (before: only
    'detection found no linear that writes into the residual stream')."""
    import transformers as T

    config = T.JetMoeConfig(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=8, kv_channels=8, intermediate_size=128,
        num_hidden_layers=1, vocab_size=96, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = T.JetMoeForCausalLM(config).eval()
    with pytest.raises(
        AutoTPError, match=r"JetMoE's experts, in its MLP and in its mixture of attention heads"
    ):
        plan_model(model, 2)
    plan_model(model, 1)  # whole, it is fine
