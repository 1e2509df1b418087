"""Tiny random HF models of every family ``init_inference`` covers, built from their configs (no
download). Sizes are chosen so TP 2 and TP 4 divide the heads unless a family's row says otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 96  # divisible by 2 and 4: the embeddings and LM heads go vocabulary-parallel
_D = {"hidden_size": 64, "num_attention_heads": 8, "intermediate_size": 128, "num_hidden_layers": 2}
_BART = {
    "d_model": 64,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 8,
    "decoder_attention_heads": 8,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "max_position_embeddings": 64,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
}
_MOE = {"num_local_experts": 4, "num_experts": 4, "num_experts_per_tok": 2}
_GROUPS = {"n_routed_experts": 4, "n_group": 1, "topk_group": 1, "pad_token_id": 0}
_DEEPSEEK = {
    "num_key_value_heads": 8,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 48,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "num_hidden_layers": 3,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "head_dim": 8,
    "n_group": 1,
    "topk_group": 1,
    "pad_token_id": 0,
}
_GPT2ISH = {"n_embd": 64, "n_head": 8, "n_layer": 2, "n_positions": 64, "bos_token_id": 0, "eos_token_id": 0}

# family -> (transformers config class, head class, config kwargs, kind)
FAMILIES: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**_D, "num_key_value_heads": 4}, "causal"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_D, "num_key_value_heads": 4}, "causal"),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {**_D, "num_key_value_heads": 4, "num_local_experts": 4, "num_experts_per_tok": 2},
        "causal",
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**_D, "num_key_value_heads": 4}, "causal"),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            **_D,
            "num_key_value_heads": 4,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 48,  # 2 x 48 != hidden: gate|up and down tell apart
            "shared_expert_intermediate_size": 64,
        },
        "causal",
    ),
    # q_norm / k_norm over each head's head_dim, between q/k_proj and the attention
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_D, "num_key_value_heads": 4, "head_dim": 8}, "causal"),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {**_D, "num_key_value_heads": 4, "head_dim": 8, "sliding_window": 16},
        "causal",
    ),
    # a fused q|k|v read at offsets its forward computes (attention stays whole), a fused gate|up chunked
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_D, "num_key_value_heads": 4, "pad_token_id": 0}, "causal"),
    "phi": ("PhiConfig", "PhiForCausalLM", {**_D, "partial_rotary_factor": 0.5}, "causal"),
    # differential attention: head i paired with head i + heads/2, value heads by halves; its lambdas
    # are head_dim (8) wide, as many as the heads
    "diffllama": ("DiffLlamaConfig", "DiffLlamaForCausalLM", {**_D, "num_key_value_heads": 8}, "causal"),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {**_D, "num_key_value_heads": 4, "head_dim": 8, **_MOE, "moe_intermediate_size": 48},
        "causal",
    ),
    # q_norm / k_norm over the whole q and k projections (every head at once): the attention stays whole,
    # the MLP (OLMo 2) or the experts (OLMoE) beside it are split
    "olmo2": (
        "Olmo2Config",
        "Olmo2ForCausalLM",
        {**_D, "num_key_value_heads": 4, "pad_token_id": 0},
        "causal",
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        {**_D, "num_key_value_heads": 4, **_MOE, "pad_token_id": 0},
        "causal",
    ),
    # multi-head latent attention (low-rank q and kv, one rope key shared by every head): kept whole; a
    # dense first layer, then routed experts beside a shared expert
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        {**_D, **_DEEPSEEK, "q_lora_rank": None},
        "causal",
    ),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {**_D, **_DEEPSEEK}, "causal"),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", {**_D, **_DEEPSEEK, **_MOE}, "causal"),
    # experts stored transposed ([experts, hidden, 2 x inner], ``bmm(x, gate_up_proj)``), a shared expert
    # beside them, an L2 norm of each head's q and k
    "llama4": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        {
            **_D,
            "num_key_value_heads": 4,
            "head_dim": 8,
            "num_local_experts": 4,
            "num_experts_per_tok": 1,
            "intermediate_size_mlp": 128,
            "pad_token_id": 0,
        },
        "causal",
    ),
    "granitemoe": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        {**_D, "num_key_value_heads": 4, **_MOE},
        "causal",
    ),
    "granitemoeshared": (
        "GraniteMoeSharedConfig",
        "GraniteMoeSharedForCausalLM",
        {**_D, "num_key_value_heads": 4, **_MOE, "shared_intermediate_size": 64},
        "causal",
    ),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", {**_D, "num_key_value_heads": 4, **_MOE}, "causal"),
    # more MoE families of transformers 5.17 whose experts are its fused 3D ones (beside shared experts,
    # dense first layers, sigmoid routers with expert groups, linear attention, per-head gates)
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        {
            **_D,
            **_MOE,
            **_GROUPS,
            "num_key_value_heads": 4,
            "moe_intermediate_size": 48,
            "first_k_dense_replace": 1,
        },
        "causal",
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",
        {
            **_D,
            **_MOE,
            "num_key_value_heads": 4,
            "moe_k": 2,
            "moe_num_experts": 4,
            "moe_intermediate_size": 48,
        },
        "causal",
    ),
    "hunyuan_v1_moe": (
        "HunYuanMoEV1Config",
        "HunYuanMoEV1ForCausalLM",
        {**_D, **_MOE, "num_key_value_heads": 4, "head_dim": 8, "pad_token_id": 0},
        "causal",
    ),
    "minimax": (
        "MiniMaxConfig",
        "MiniMaxForCausalLM",
        {**_D, **_MOE, "num_key_value_heads": 4, "head_dim": 8, "pad_token_id": 0},
        "causal",
    ),
    "exaone_moe": (
        "ExaoneMoeConfig",
        "ExaoneMoeForCausalLM",
        {
            **_D,
            **_MOE,
            **_GROUPS,
            "num_key_value_heads": 4,
            "moe_intermediate_size": 48,
            "first_k_dense_replace": 0,
        },
        "causal",
    ),
    "afmoe": (
        "AfmoeConfig",
        "AfmoeForCausalLM",
        {
            **_D,
            **_MOE,
            "num_key_value_heads": 4,
            "head_dim": 8,
            "moe_intermediate_size": 48,
            "pad_token_id": 0,
        },
        "causal",
    ),
    "mimo_v2_flash": (
        "MiMoV2FlashConfig",
        "MiMoV2FlashForCausalLM",
        {**_D, **_MOE, **_GROUPS, "num_key_value_heads": 4, "head_dim": 8, "moe_intermediate_size": 48},
        "causal",
    ),
    "cohere2_moe": (
        "Cohere2MoeConfig",
        "Cohere2MoeForCausalLM",
        {**_D, **_MOE, "num_key_value_heads": 4, "head_dim": 8, "pad_token_id": 0},
        "causal",
    ),
    "solar_open": (
        "SolarOpenConfig",
        "SolarOpenForCausalLM",
        {**_D, **_MOE, **_GROUPS, "num_key_value_heads": 4, "head_dim": 8, "moe_intermediate_size": 48},
        "causal",
    ),
    "minimax_m2": (
        "MiniMaxM2Config",
        "MiniMaxM2ForCausalLM",
        {**_D, **_MOE, "num_key_value_heads": 4, "head_dim": 8, "pad_token_id": 0},
        "causal",
    ),
    "flex_olmo": (
        "FlexOlmoConfig",
        "FlexOlmoForCausalLM",
        {**_D, **_MOE, "num_key_value_heads": 4, "pad_token_id": 0},
        "causal",
    ),
    # a fused q|k|v clamped (clip_qkv) before it is split; its experts are 2D matrices of every expert's
    # rows stacked ([experts x ffn, hidden]), cut per expert by a view in the forward
    "dbrx": (
        "DbrxConfig",
        "DbrxForCausalLM",
        {
            "d_model": 64,
            "n_heads": 8,
            "n_layers": 2,
            "max_seq_len": 64,
            "attn_config": {"kv_n_heads": 4, "rope_theta": 10000.0, "clip_qkv": 8.0},
            "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2},
        },
        "causal",
    ),
    # attention sinks: one learned logit per head; its experts stored transposed, with biases, gate and
    # up interleaved
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        {
            **_D,
            "num_key_value_heads": 4,
            "head_dim": 8,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 16,
            "pad_token_id": 0,
        },
        "causal",
    ),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        {
            "hidden_size": 64,
            "num_attention_heads": 8,
            "num_kv_heads": 4,
            "num_hidden_layers": 2,
            "new_decoder_architecture": True,
        },
        "causal",
    ),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {**_GPT2ISH, "rotary_dim": 4}, "causal"),
    "gpt_neo": (
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        {
            "hidden_size": 64,
            "num_heads": 8,
            "num_layers": 2,
            "attention_types": [[["global", "local"], 1]],
            "max_position_embeddings": 64,
            "window_size": 16,
        },
        "causal",
    ),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {**_D, "rotary_pct": 0.5}, "causal"),
    # CodeGen's forward splits qkv into 4 groups: heads must divide by 4 x TP
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", {**_GPT2ISH, "n_head": 16, "rotary_dim": 4}, "causal"),
    "bloom": ("BloomConfig", "BloomForCausalLM", {"hidden_size": 64, "n_head": 8, "n_layer": 2}, "causal"),
    "mpt": (
        "MptConfig",
        "MptForCausalLM",
        {"d_model": 64, "n_heads": 8, "n_layers": 2, "expansion_ratio": 2, "max_seq_len": 64},
        "causal",
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        {
            "hidden_size": 64,
            "num_attention_heads": 8,
            "ffn_dim": 128,
            "num_hidden_layers": 2,
            "word_embed_proj_dim": 64,
            "max_position_embeddings": 64,
        },
        "causal",
    ),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", _GPT2ISH, "causal"),
    # a vocabulary no TP size divides: embeddings and LM head stay replicated (tied and untied)
    "gpt2_odd_vocab": ("GPT2Config", "GPT2LMHeadModel", {**_GPT2ISH, "vocab_size": VOCAB + 1}, "causal"),
    "llama_odd_vocab": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {**_D, "num_key_value_heads": 4, "vocab_size": VOCAB + 1},
        "causal",
    ),
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        {
            "d_model": 64,
            "d_kv": 8,
            "d_ff": 128,
            "num_layers": 2,
            "num_heads": 8,
            "relative_attention_num_buckets": 8,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
            "eos_token_id": 1,
        },
        "seq2seq",
    ),
    "bart": ("BartConfig", "BartForConditionalGeneration", _BART, "seq2seq"),
    "m2m_100": ("M2M100Config", "M2M100ForConditionalGeneration", _BART, "seq2seq"),
    "marian": ("MarianConfig", "MarianMTModel", {**_BART, "decoder_start_token_id": 1}, "seq2seq"),
    "pegasus": (
        "PegasusConfig",
        "PegasusForConditionalGeneration",
        {**_BART, "decoder_start_token_id": 1},
        "seq2seq",
    ),
    "bert": ("BertConfig", "BertForMaskedLM", {**_D, "max_position_embeddings": 64}, "encoder"),
    "bert_cls": (
        "BertConfig",
        "BertForSequenceClassification",
        {**_D, "max_position_embeddings": 64, "num_labels": 3},
        "encoder",
    ),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", {**_D, "max_position_embeddings": 72}, "encoder"),
    "xlm_roberta": (
        "XLMRobertaConfig",
        "XLMRobertaForMaskedLM",
        {**_D, "max_position_embeddings": 72},
        "encoder",
    ),
    "electra": (
        "ElectraConfig",
        "ElectraForMaskedLM",
        {**_D, "embedding_size": 32, "max_position_embeddings": 64},
        "encoder",
    ),
    "albert": (
        "AlbertConfig",
        "AlbertForMaskedLM",
        {**_D, "embedding_size": 32, "max_position_embeddings": 64},
        "encoder",
    ),
    # a relative position bias for all heads, built by the encoder and passed to each attention
    "mpnet": ("MPNetConfig", "MPNetForMaskedLM", {**_D, "max_position_embeddings": 64}, "encoder"),
    # a fused q|k|v read as qkv.view(..., 3, heads, head_dim): three blocks the trace cannot see
    "modernbert": (
        "ModernBertConfig",
        "ModernBertForMaskedLM",
        {**_D, "max_position_embeddings": 64, "pad_token_id": 0, "local_attention": 16},
        "encoder",
    ),
    "deberta_v2": (
        "DebertaV2Config",
        "DebertaV2ForMaskedLM",
        {
            **_D,
            "max_position_embeddings": 64,
            "relative_attention": True,
            "pos_att_type": ["p2c", "c2p"],
            "position_buckets": 16,
            "share_att_key": True,
            "norm_rel_ebd": "layer_norm",
        },
        "encoder",
    ),
    # its attention reads the head count from the config and keeps per-head parameters (r_w_bias, r_kernel
    # [d_model, heads, d_head], seg_embed [2, heads, d_head], ...)
    "funnel": (
        "FunnelConfig",
        "FunnelForMaskedLM",
        {
            "block_sizes": [1, 1],
            "d_model": 64,
            "n_head": 8,
            "d_head": 8,
            "d_inner": 128,
            "num_decoder_layers": 1,
        },
        "encoder",
    ),
    # its LM head reads the tied decoder weight joined with another matrix (``matmul(cat(...))``), never
    # calling the head: the vocabulary stays whole
    "mobilebert": (
        "MobileBertConfig",
        "MobileBertForMaskedLM",
        {
            **_D,
            "embedding_size": 32,
            "intra_bottleneck_size": 32,
            "num_attention_heads": 4,
            "num_feedforward_networks": 2,
            "max_position_embeddings": 64,
        },
        "encoder",
    ),
}


def build(family: str, seed: int = 0, **overrides: Any) -> tuple[torch.nn.Module, str]:
    """A seeded random ``family`` model (float32, eval mode) and its kind: causal, seq2seq or encoder."""
    import transformers as T

    config_cls, model_cls, kwargs, kind = FAMILIES[family]
    config = getattr(T, config_cls)(**{"vocab_size": VOCAB, **kwargs, **overrides})
    # larger than HF's default init: peaked logits, so greedy tokens do not hinge on rounding
    config.initializer_range = 0.2
    config.initializer_factor = 4.0  # T5's spelling
    torch.manual_seed(seed)
    model = getattr(T, model_cls)(config).eval()
    return model, kind


def tokenizer() -> Any:
    """A word-level tokenizer over the tiny vocabulary ("w3 w17 ..."), for ``transformers.pipeline``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def prompt(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (2, 7), generator=g)  # [batch, seq]


def run_family_checks(check: Any) -> None:
    """A rank's main: ``argv`` OUT TP FAMILY...; ``check(family, tp)`` per family (a crash is that
    family's row, not the end of the others), rank 0 writes the rows to OUT as JSON lines."""
    import json
    import sys
    import traceback

    import conveyor

    out, tp, families = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)
    info = conveyor.init_distributed(backend="gloo", device="cpu")
    rows = []
    for family in families:
        try:
            rows.append(check(family, tp))
        except Exception:  # one family's crash must not hide the others' results
            rows.append({"family": family, "error": traceback.format_exc()[-1500:]})
    if info.rank == 0:
        with open(out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def family_results(
    tmp: Path, module: str, tp: int, families: list[str], world: int = 0, timeout: float = 600
) -> dict[str, dict[str, Any]]:
    """Run ``module`` (a ``run_family_checks`` main) on ``world`` (default ``tp``) gloo ranks; rank 0's
    rows by family."""
    import json

    from tests.worker.inference.launch import run_ranks

    out = tmp / f"tp{tp}.jsonl"
    run_ranks(world or tp, ["-m", module, str(out), str(tp), *families], timeout=timeout)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {r["family"]: r for r in rows}
