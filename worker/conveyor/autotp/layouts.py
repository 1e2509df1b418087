"""What the traced dataflow cannot show, as data: attribute names that hold head counts or head widths,
and the few layouts that HF code hard-codes inside a forward.

Everything else (which linear is column- or row-parallel, fused blocks split on the last dim, MoE
experts, tied embeddings) is found from the model's structure in ``trace.py`` and ``plan.py``.
"""

from __future__ import annotations

# Attributes of an attention module (or its children) that count heads: divided by the TP size.
HEAD_COUNT_ATTRS = (
    "num_heads",
    "num_attention_heads",
    "n_head",
    "n_heads",
    "num_key_value_heads",
    "num_kv_heads",
    "n_kv_heads",
    "kv_n_heads",
)
# Attributes holding a width of all heads together (heads x head_dim): divided by the TP size too.
HEAD_WIDTH_ATTRS = ("all_head_size", "embed_dim", "inner_dim", "split_size", "hidden_size")
# The width of one head, where an attention module keeps it.
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim")

# CodeGen's attention reshapes its fused qkv into 4 groups of (q | v | k) with ``mp_num = 4`` written in
# its forward, so each rank takes its share of every group (and the same heads of out_proj's input).
FUSED_GROUPS = {"CodeGenAttention": 4}

# Attention that reads its fused q|k|v through a view the trace does not see into: class -> how many
# equal blocks of all heads it holds (ModernBERT: ``qkv.view(..., 3, -1, head_dim).unbind(dim=-3)``).
FUSED_BLOCKS = {"ModernBertAttention": 3}

# Attention that cuts its fused q|k|v at offsets computed from the model's config and its own head counts
# (Phi-3: ``qkv[..., :query_pos]`` with ``query_pos = self.config.num_attention_heads * self.head_dim``),
# or its head count (Funnel: ``n_head = self.config.n_head``): class -> the config attributes it reads,
# the query heads first. With q, k and v each split by heads, the module gets its own copy of the config
# with these divided, so its offsets and head counts are those of the rank's heads.
CONFIG_HEAD_COUNTS = {
    "Phi3Attention": ("num_attention_heads", "num_key_value_heads"),
    "FunnelRelMultiheadAttention": ("n_head",),
}

# Parameters of an attention module with values per query head, split with the heads: by name, as a
# head_dim-sized parameter (DiffLlama's lambdas) has the same shape wherever head_dim equals the head
# count (GPT-OSS 120B: 64 and 64). class -> {parameter: its heads dimension}.
HEAD_PARAMS = {
    "GptOssAttention": {"sinks": 0},
    "MiMoV2FlashAttention": {"sinks": 0},
    # Funnel's relative attention: [heads, d_head] biases, r_kernel [d_model, heads, d_head], seg_embed
    # [2, heads, d_head]
    "FunnelRelMultiheadAttention": {
        "r_w_bias": 0,
        "r_r_bias": 0,
        "r_s_bias": 0,
        "r_kernel": 1,
        "seg_embed": 1,
    },
}

# Differential attention pairs head i with head i + heads/2 (the value heads likewise, by halves): q, k
# and v are each split per half, so a rank keeps both heads of its pairs; the combined output holds one
# block per pair, in order, so o_proj's input is split as usual.
HEAD_HALVES = {"DiffLlamaAttention"}

# Head-wise attention biases built outside the attention module for all heads, so each rank slices its
# heads out of the argument: class -> (argument name, how the heads sit in it).
#   "batch_heads": [batch x heads, ...] (BLOOM's alibi)    "heads": [heads, ...] (MPT's alibi)
#   "batch_then_heads": [batch, heads, ...] (MPNet's relative position bias)
HEAD_BIAS_ARGS = {
    "BloomAttention": ("alibi", "batch_heads"),
    "MptAttention": ("position_bias", "heads"),
    "MPNetSelfAttention": ("position_bias", "batch_then_heads"),
}

# MoE experts stored as 2D matrices of every expert's rows stacked ([experts x inner, hidden]) and cut per
# expert by a view in the forward, with the inner width read from the module (DBRX:
# ``mlp.w1.view(-1, self.ffn_hidden_size, hidden)[expert]``): class -> (the child holding the weights, the
# weights, the attribute holding one expert's inner width, the attribute counting the experts). Every
# weight is split on dim 0, each expert's rows alike: w1 and v1 are [inner, hidden] per expert (gate and
# up: column-parallel), w2 is [inner, hidden] too but read as ``x @ w2`` (down: row-parallel).
STACKED_EXPERTS = {"DbrxExperts": ("mlp", ("w1", "v1", "w2"), "ffn_hidden_size", "num_experts")}

# Modules whose layout automatic tensor parallelism does not split, refused by class with the reason:
# class -> why.
REFUSED_MODULES = {
    "JetMoeParallelExperts": (
        "JetMoE's experts, in its MLP and in its mixture of attention heads (MoA: each token's query heads "
        "come from experts), are one module per projection, called with per-expert token counts "
        "(expert_size) and a bias added after the combined output; automatic tensor parallelism does not "
        "split them: run JetMoE with tp_size 1"
    ),
}
