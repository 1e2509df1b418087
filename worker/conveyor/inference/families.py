"""Model families: a HF ``config.json`` -> ``Arch`` (what our compact model needs to know) and the HF
weight names of each of our parameters.

One decoder block serves every family; the differences are data here: RMSNorm or LayerNorm, rotary or
learned positions, parallel residual (GPT-NeoX), pre- or post-norm (OPT-350m, BERT), gated or plain
MLP, biases, fused qkv layouts (GPT-2's Conv1D ``c_attn`` [hidden, 3 x hidden] with q|k|v column blocks;
GPT-NeoX's ``query_key_value`` [heads x (q|k|v) x head_dim] interleaved per head), OPT's position offset
of 2 and its ``project_in``/``project_out``.

A family we do not know is refused by name, with the supported list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import AutoConfig, PretrainedConfig

# model_type -> HF decoder/encoder layer class name (the key of an explicit tensor-parallel policy).
LAYER_CLASSES: dict[str, str] = {
    "llama": "LlamaDecoderLayer",
    "mistral": "MistralDecoderLayer",
    "qwen2": "Qwen2DecoderLayer",
    "gpt_neox": "GPTNeoXLayer",
    "opt": "OPTDecoderLayer",
    "gpt2": "GPT2Block",
    "bert": "BertLayer",
}
CAUSAL_FAMILIES = ("llama", "mistral", "qwen2", "gpt_neox", "opt", "gpt2")
ENCODER_FAMILIES = ("bert",)
SUPPORTED = CAUSAL_FAMILIES + ENCODER_FAMILIES
ACTIVATION_NAMES = ("silu", "swish", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class UnsupportedModelError(ValueError):
    pass


# How one HF linear (or fused linear) of a layer feeds our parameters:
#   "q" / "k" / "v"   a projection whose output rows are heads (column-parallel by heads)
#   "qkv_heads"       GPT-NeoX fused qkv, rows [heads, 3, head_dim] (column-parallel by heads)
#   "qkv_blocks"      GPT-2 fused qkv, output columns q | k | v (column-parallel by heads, per block)
#   "o"               attention output, input columns are heads (row-parallel)
#   "gate" / "up"     MLP input (column-parallel)
#   "down"            MLP output (row-parallel)
LinearKind = Literal["q", "k", "v", "qkv_heads", "qkv_blocks", "o", "gate", "up", "down"]


@dataclass(frozen=True)
class LayerLinear:
    name: str  # relative to the layer prefix, without ".weight"
    kind: LinearKind
    bias: bool


@dataclass(frozen=True)
class LayerNormWeights:
    name: str  # relative to the layer prefix, without ".weight"
    ours: Literal["attn_norm", "mlp_norm"]


@dataclass(frozen=True)
class NameMap:
    """HF tensor names of a family. ``globals_`` maps our name -> HF name (first one present wins)."""

    layer_prefix: str  # e.g. "model.layers.{i}."
    linears: tuple[LayerLinear, ...]
    norms: tuple[LayerNormWeights, ...]
    globals_: dict[str, tuple[str, ...]]
    conv1d: bool = False  # GPT-2 stores Linear weights transposed ([in, out])
    ignored_suffixes: tuple[str, ...] = ()  # buffers some checkpoints carry (never parameters)
    optional: tuple[str, ...] = ()  # our global names that may be absent (tied lm_head, BERT pooler)


@dataclass(frozen=True)
class Arch:
    family: str
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    norm: Literal["rms", "layer"]
    norm_eps: float
    norm_position: Literal["pre", "post"]
    positions: Literal["rotary", "learned"]
    max_positions: int
    activation: str
    gated_mlp: bool
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    tie_embeddings: bool
    rotary_dim: int = 0
    position_offset: int = 0  # OPT's learned positions start at index 2
    parallel_residual: bool = False
    embed_dim: int = 0  # OPT's word_embed_proj_dim (project_in/out when != hidden); 0 -> hidden
    final_norm: bool = True
    sliding_window: int | None = None
    causal: bool = True
    type_vocab_size: int = 0  # BERT token types (we embed type 0)
    eos_token_ids: tuple[int, ...] = ()
    hf_config: Any = field(default=None, compare=False, repr=False)

    @property
    def layer_class(self) -> str:
        return LAYER_CLASSES[self.family]

    @property
    def word_dim(self) -> int:
        return self.embed_dim or self.hidden


def _eos(config: PretrainedConfig) -> tuple[int, ...]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)


def _rope(config: PretrainedConfig, head_dim: int) -> tuple[int, dict[str, Any]]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise UnsupportedModelError(
            f"rope_type {rope_type!r} changes with the sequence length and is not supported; "
            "supported: default, linear, llama3, yarn"
        )
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    return int(head_dim * factor), params


def arch_from_config(config: PretrainedConfig) -> Arch:
    arch = _arch_from_config(config)
    if arch.activation not in ACTIVATION_NAMES:
        raise UnsupportedModelError(
            f"{arch.family} activation {arch.activation!r} is not supported; supported: {', '.join(ACTIVATION_NAMES)}"
        )
    return arch


def _arch_from_config(config: PretrainedConfig) -> Arch:
    family = config.model_type
    if family not in SUPPORTED:
        raise UnsupportedModelError(
            f"model family {family!r} ({', '.join(getattr(config, 'architectures', None) or [])}) is not "
            f"supported; supported families: {', '.join(SUPPORTED)}"
        )
    common: dict[str, Any] = {"family": family, "vocab_size": config.vocab_size, "hf_config": config}
    if family in ("llama", "mistral", "qwen2"):
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        rotary_dim, _ = _rope(config, head_dim)
        window = getattr(config, "sliding_window", None)
        if family == "qwen2" and not getattr(config, "use_sliding_window", False):
            window = None
        return Arch(
            **common,
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            norm="rms",
            norm_eps=config.rms_norm_eps,
            norm_position="pre",
            positions="rotary",
            rotary_dim=rotary_dim,
            max_positions=config.max_position_embeddings,
            activation=config.hidden_act,
            gated_mlp=True,
            qkv_bias=family == "qwen2" or bool(getattr(config, "attention_bias", False)),
            out_bias=bool(getattr(config, "attention_bias", False)) and family != "qwen2",
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            tie_embeddings=bool(config.tie_word_embeddings),
            sliding_window=window,
            eos_token_ids=_eos(config),
        )
    if family == "gpt_neox":
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        rotary_dim, _ = _rope(config, head_dim)
        return Arch(
            **common,
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            norm="layer",
            norm_eps=config.layer_norm_eps,
            norm_position="pre",
            positions="rotary",
            rotary_dim=rotary_dim,
            max_positions=config.max_position_embeddings,
            activation=config.hidden_act,
            gated_mlp=False,
            qkv_bias=bool(config.attention_bias),
            out_bias=bool(config.attention_bias),
            mlp_bias=True,
            tie_embeddings=bool(config.tie_word_embeddings),
            parallel_residual=bool(config.use_parallel_residual),
            eos_token_ids=_eos(config),
        )
    if family == "opt":
        if not config.layer_norm_elementwise_affine:
            raise UnsupportedModelError("OPT with layer_norm_elementwise_affine=false is not supported")
        return Arch(
            **common,
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=config.num_attention_heads,
            head_dim=config.hidden_size // config.num_attention_heads,
            intermediate=config.ffn_dim,
            norm="layer",
            norm_eps=1e-5,
            norm_position="pre" if config.do_layer_norm_before else "post",
            positions="learned",
            position_offset=2,
            max_positions=config.max_position_embeddings,
            activation=config.activation_function,
            gated_mlp=False,
            qkv_bias=bool(config.enable_bias),
            out_bias=bool(config.enable_bias),
            mlp_bias=bool(config.enable_bias),
            tie_embeddings=bool(config.tie_word_embeddings),
            embed_dim=config.word_embed_proj_dim,
            final_norm=bool(config.do_layer_norm_before and not config._remove_final_layer_norm),
            eos_token_ids=_eos(config),
        )
    if family == "gpt2":
        if config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn:
            raise UnsupportedModelError(
                "GPT-2 with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn is not supported"
            )
        return Arch(
            **common,
            hidden=config.n_embd,
            layers=config.n_layer,
            heads=config.n_head,
            kv_heads=config.n_head,
            head_dim=config.n_embd // config.n_head,
            intermediate=config.n_inner or 4 * config.n_embd,
            norm="layer",
            norm_eps=config.layer_norm_epsilon,
            norm_position="pre",
            positions="learned",
            max_positions=config.n_positions,
            activation=config.activation_function,
            gated_mlp=False,
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
            tie_embeddings=bool(config.tie_word_embeddings),
            eos_token_ids=_eos(config),
        )
    # bert
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise UnsupportedModelError("BERT with relative position embeddings is not supported")
    return Arch(
        **common,
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        kv_heads=config.num_attention_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        intermediate=config.intermediate_size,
        norm="layer",
        norm_eps=config.layer_norm_eps,
        norm_position="post",
        positions="learned",
        max_positions=config.max_position_embeddings,
        activation=config.hidden_act,
        gated_mlp=False,
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_embeddings=False,
        final_norm=False,
        causal=False,
        type_vocab_size=config.type_vocab_size,
    )


def load_arch(model_dir: str | Path) -> Arch:
    """Read ``config.json`` of a local HF checkpoint (no network) and describe its architecture."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: model.path must be a HF checkpoint directory")
    model_type = json.loads(path.read_text()).get("model_type")
    if model_type not in SUPPORTED:
        raise UnsupportedModelError(
            f"model family {model_type!r} in {path} is not supported; supported families: "
            f"{', '.join(SUPPORTED)}"
        )
    return arch_from_config(AutoConfig.from_pretrained(str(model_dir), local_files_only=True))


def name_map(arch: Arch) -> NameMap:
    f = arch.family
    if f in ("llama", "mistral", "qwen2"):
        return NameMap(
            layer_prefix="model.layers.{i}.",
            linears=(
                LayerLinear("self_attn.q_proj", "q", arch.qkv_bias),
                LayerLinear("self_attn.k_proj", "k", arch.qkv_bias),
                LayerLinear("self_attn.v_proj", "v", arch.qkv_bias),
                LayerLinear("self_attn.o_proj", "o", arch.out_bias),
                LayerLinear("mlp.gate_proj", "gate", arch.mlp_bias),
                LayerLinear("mlp.up_proj", "up", arch.mlp_bias),
                LayerLinear("mlp.down_proj", "down", arch.mlp_bias),
            ),
            norms=(
                LayerNormWeights("input_layernorm", "attn_norm"),
                LayerNormWeights("post_attention_layernorm", "mlp_norm"),
            ),
            globals_={
                "embed": ("model.embed_tokens.weight",),
                "final_norm.weight": ("model.norm.weight",),
                "lm_head": ("lm_head.weight",),
            },
            ignored_suffixes=("rotary_emb.inv_freq",),
            optional=("lm_head",) if arch.tie_embeddings else (),
        )
    if f == "gpt_neox":
        return NameMap(
            layer_prefix="gpt_neox.layers.{i}.",
            linears=(
                LayerLinear("attention.query_key_value", "qkv_heads", arch.qkv_bias),
                LayerLinear("attention.dense", "o", arch.out_bias),
                LayerLinear("mlp.dense_h_to_4h", "up", True),
                LayerLinear("mlp.dense_4h_to_h", "down", True),
            ),
            norms=(
                LayerNormWeights("input_layernorm", "attn_norm"),
                LayerNormWeights("post_attention_layernorm", "mlp_norm"),
            ),
            globals_={
                "embed": ("gpt_neox.embed_in.weight",),
                "final_norm.weight": ("gpt_neox.final_layer_norm.weight",),
                "final_norm.bias": ("gpt_neox.final_layer_norm.bias",),
                "lm_head": ("lm_head.weight", "embed_out.weight"),
            },
            ignored_suffixes=("rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias"),
            optional=("lm_head",) if arch.tie_embeddings else (),
        )
    if f == "opt":
        g: dict[str, tuple[str, ...]] = {
            "embed": ("model.decoder.embed_tokens.weight",),
            "pos_embed": ("model.decoder.embed_positions.weight",),
            "lm_head": ("lm_head.weight",),
        }
        if arch.final_norm:
            g["final_norm.weight"] = ("model.decoder.final_layer_norm.weight",)
            g["final_norm.bias"] = ("model.decoder.final_layer_norm.bias",)
        if arch.word_dim != arch.hidden:
            g["project_in"] = ("model.decoder.project_in.weight",)
            g["project_out"] = ("model.decoder.project_out.weight",)
        return NameMap(
            layer_prefix="model.decoder.layers.{i}.",
            linears=(
                LayerLinear("self_attn.q_proj", "q", arch.qkv_bias),
                LayerLinear("self_attn.k_proj", "k", arch.qkv_bias),
                LayerLinear("self_attn.v_proj", "v", arch.qkv_bias),
                LayerLinear("self_attn.out_proj", "o", arch.out_bias),
                LayerLinear("fc1", "up", arch.mlp_bias),
                LayerLinear("fc2", "down", arch.mlp_bias),
            ),
            norms=(
                LayerNormWeights("self_attn_layer_norm", "attn_norm"),
                LayerNormWeights("final_layer_norm", "mlp_norm"),
            ),
            globals_=g,
            optional=("lm_head",) if arch.tie_embeddings else (),
        )
    if f == "gpt2":
        return NameMap(
            layer_prefix="transformer.h.{i}.",
            linears=(
                LayerLinear("attn.c_attn", "qkv_blocks", True),
                LayerLinear("attn.c_proj", "o", True),
                LayerLinear("mlp.c_fc", "up", True),
                LayerLinear("mlp.c_proj", "down", True),
            ),
            norms=(LayerNormWeights("ln_1", "attn_norm"), LayerNormWeights("ln_2", "mlp_norm")),
            globals_={
                "embed": ("transformer.wte.weight",),
                "pos_embed": ("transformer.wpe.weight",),
                "final_norm.weight": ("transformer.ln_f.weight",),
                "final_norm.bias": ("transformer.ln_f.bias",),
                "lm_head": ("lm_head.weight",),
            },
            conv1d=True,
            ignored_suffixes=(".attn.bias", ".attn.masked_bias"),
            optional=("lm_head",) if arch.tie_embeddings else (),
        )
    # bert: BertModel checkpoints have no prefix; BertFor* ones prefix "bert." (the loader tries both).
    return NameMap(
        layer_prefix="encoder.layer.{i}.",
        linears=(
            LayerLinear("attention.self.query", "q", True),
            LayerLinear("attention.self.key", "k", True),
            LayerLinear("attention.self.value", "v", True),
            LayerLinear("attention.output.dense", "o", True),
            LayerLinear("intermediate.dense", "up", True),
            LayerLinear("output.dense", "down", True),
        ),
        norms=(
            LayerNormWeights("attention.output.LayerNorm", "attn_norm"),
            LayerNormWeights("output.LayerNorm", "mlp_norm"),
        ),
        globals_={
            "embed": ("embeddings.word_embeddings.weight",),
            "pos_embed": ("embeddings.position_embeddings.weight",),
            "type_embed": ("embeddings.token_type_embeddings.weight",),
            "embed_norm.weight": ("embeddings.LayerNorm.weight",),
            "embed_norm.bias": ("embeddings.LayerNorm.bias",),
            "pooler.weight": ("pooler.dense.weight",),
            "pooler.bias": ("pooler.dense.bias",),
        },
        ignored_suffixes=("embeddings.position_ids",),
        optional=("pooler.weight", "pooler.bias"),
    )
