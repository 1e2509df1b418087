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
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # a worker's start never imports transformers (config_cache.py)
    from transformers import PretrainedConfig

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


def _sizes(
    config: PretrainedConfig, intermediate: int, head_dim: int = 0, kv_heads: int = 0
) -> dict[str, Any]:
    """The sizes every family has, read through HF's generic config names (GPT-2's config maps them to
    n_embd, n_layer, n_head, n_positions). ``head_dim`` / ``kv_heads`` 0: hidden // heads / heads."""
    heads = config.num_attention_heads
    return {
        "hidden": config.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": heads,
        "kv_heads": kv_heads or heads,
        "head_dim": head_dim or config.hidden_size // heads,
        "intermediate": intermediate,
        "max_positions": config.max_position_embeddings,
    }


def _arch_from_config(config: PretrainedConfig) -> Arch:
    family = config.model_type
    if family not in SUPPORTED:
        raise UnsupportedModelError(
            f"model family {family!r} ({', '.join(getattr(config, 'architectures', None) or [])}) is not "
            f"supported; supported families: {', '.join(SUPPORTED)}"
        )
    common: dict[str, Any] = {"family": family, "vocab_size": config.vocab_size, "hf_config": config}
    if family in CAUSAL_FAMILIES:
        common.update(tie_embeddings=bool(config.tie_word_embeddings), eos_token_ids=_eos(config))
    if family in ("llama", "mistral", "qwen2"):
        sizes = _sizes(
            config,
            config.intermediate_size,
            head_dim=getattr(config, "head_dim", None) or 0,
            kv_heads=getattr(config, "num_key_value_heads", None) or 0,
        )
        window = getattr(config, "sliding_window", None)
        if family == "qwen2" and not getattr(config, "use_sliding_window", False):
            window = None
        return Arch(
            **common,
            **sizes,
            norm="rms",
            norm_eps=config.rms_norm_eps,
            norm_position="pre",
            positions="rotary",
            rotary_dim=_rope(config, sizes["head_dim"])[0],
            activation=config.hidden_act,
            gated_mlp=True,
            qkv_bias=family == "qwen2" or bool(getattr(config, "attention_bias", False)),
            out_bias=bool(getattr(config, "attention_bias", False)) and family != "qwen2",
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            sliding_window=window,
        )
    if family == "gpt_neox":
        sizes = _sizes(config, config.intermediate_size)
        return Arch(
            **common,
            **sizes,
            norm="layer",
            norm_eps=config.layer_norm_eps,
            norm_position="pre",
            positions="rotary",
            rotary_dim=_rope(config, sizes["head_dim"])[0],
            activation=config.hidden_act,
            gated_mlp=False,
            qkv_bias=bool(config.attention_bias),
            out_bias=bool(config.attention_bias),
            mlp_bias=True,
            parallel_residual=bool(config.use_parallel_residual),
        )
    if family == "opt":
        if not config.layer_norm_elementwise_affine:
            raise UnsupportedModelError("OPT with layer_norm_elementwise_affine=false is not supported")
        return Arch(
            **common,
            **_sizes(config, config.ffn_dim),
            norm="layer",
            norm_eps=1e-5,
            norm_position="pre" if config.do_layer_norm_before else "post",
            positions="learned",
            position_offset=2,
            activation=config.activation_function,
            gated_mlp=False,
            qkv_bias=bool(config.enable_bias),
            out_bias=bool(config.enable_bias),
            mlp_bias=bool(config.enable_bias),
            embed_dim=config.word_embed_proj_dim,
            final_norm=bool(config.do_layer_norm_before and not config._remove_final_layer_norm),
        )
    if family == "gpt2":
        if config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn:
            raise UnsupportedModelError(
                "GPT-2 with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn is not supported"
            )
        return Arch(
            **common,
            **_sizes(config, config.n_inner or 4 * config.n_embd),
            norm="layer",
            norm_eps=config.layer_norm_epsilon,
            norm_position="pre",
            positions="learned",
            activation=config.activation_function,
            gated_mlp=False,
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
        )
    # bert
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise UnsupportedModelError("BERT with relative position embeddings is not supported")
    return Arch(
        **common,
        **_sizes(config, config.intermediate_size),
        norm="layer",
        norm_eps=config.layer_norm_eps,
        norm_position="post",
        positions="learned",
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


def load_arch(model_dir: str | Path, cache_dir: Path | None = None) -> Arch:
    """Read ``config.json`` of a local HF checkpoint (no network) and describe its architecture.
    ``cache_dir``: the compile cache, where the resolved config is kept (config_cache.py)."""
    from conveyor.inference.model.config_cache import resolved_config

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: model.path must be a HF checkpoint directory")
    model_type = json.loads(path.read_text()).get("model_type")
    if model_type not in SUPPORTED:
        raise UnsupportedModelError(
            f"model family {model_type!r} in {path} is not supported; supported families: "
            f"{', '.join(SUPPORTED)}"
        )
    return arch_from_config(resolved_config(model_dir, cache_dir))


@dataclass(frozen=True)
class _FamilyNames:
    """The HF names of a family, before the ``Arch`` decides biases and which globals exist."""

    layer_prefix: str
    linears: tuple[tuple[str, LinearKind], ...]  # (name, kind); the bias follows the Arch
    norms: tuple[str, str]  # the attention's and the MLP's norm
    globals_: dict[str, tuple[str, ...]]
    conv1d: bool = False
    ignored_suffixes: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()  # besides lm_head, which is optional wherever the embeddings are tied


_LLAMA_NAMES = _FamilyNames(
    layer_prefix="model.layers.{i}.",
    linears=(
        ("self_attn.q_proj", "q"),
        ("self_attn.k_proj", "k"),
        ("self_attn.v_proj", "v"),
        ("self_attn.o_proj", "o"),
        ("mlp.gate_proj", "gate"),
        ("mlp.up_proj", "up"),
        ("mlp.down_proj", "down"),
    ),
    norms=("input_layernorm", "post_attention_layernorm"),
    globals_={
        "embed": ("model.embed_tokens.weight",),
        "final_norm.weight": ("model.norm.weight",),
        "lm_head": ("lm_head.weight",),
    },
    ignored_suffixes=("rotary_emb.inv_freq",),
)

# model_type -> its names. Globals a config leaves out are dropped by ``name_map`` (OPT-350m has no final
# norm and projects its embeddings in and out).
_FAMILY_NAMES: dict[str, _FamilyNames] = {
    "llama": _LLAMA_NAMES,
    "mistral": _LLAMA_NAMES,
    "qwen2": _LLAMA_NAMES,
    "gpt_neox": _FamilyNames(
        layer_prefix="gpt_neox.layers.{i}.",
        linears=(
            ("attention.query_key_value", "qkv_heads"),
            ("attention.dense", "o"),
            ("mlp.dense_h_to_4h", "up"),
            ("mlp.dense_4h_to_h", "down"),
        ),
        norms=("input_layernorm", "post_attention_layernorm"),
        globals_={
            "embed": ("gpt_neox.embed_in.weight",),
            "final_norm.weight": ("gpt_neox.final_layer_norm.weight",),
            "final_norm.bias": ("gpt_neox.final_layer_norm.bias",),
            "lm_head": ("lm_head.weight", "embed_out.weight"),
        },
        ignored_suffixes=("rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias"),
    ),
    "opt": _FamilyNames(
        layer_prefix="model.decoder.layers.{i}.",
        linears=(
            ("self_attn.q_proj", "q"),
            ("self_attn.k_proj", "k"),
            ("self_attn.v_proj", "v"),
            ("self_attn.out_proj", "o"),
            ("fc1", "up"),
            ("fc2", "down"),
        ),
        norms=("self_attn_layer_norm", "final_layer_norm"),
        globals_={
            "embed": ("model.decoder.embed_tokens.weight",),
            "pos_embed": ("model.decoder.embed_positions.weight",),
            "lm_head": ("lm_head.weight",),
            "final_norm.weight": ("model.decoder.final_layer_norm.weight",),
            "final_norm.bias": ("model.decoder.final_layer_norm.bias",),
            "project_in": ("model.decoder.project_in.weight",),
            "project_out": ("model.decoder.project_out.weight",),
        },
    ),
    "gpt2": _FamilyNames(
        layer_prefix="transformer.h.{i}.",
        linears=(
            ("attn.c_attn", "qkv_blocks"),
            ("attn.c_proj", "o"),
            ("mlp.c_fc", "up"),
            ("mlp.c_proj", "down"),
        ),
        norms=("ln_1", "ln_2"),
        globals_={
            "embed": ("transformer.wte.weight",),
            "pos_embed": ("transformer.wpe.weight",),
            "final_norm.weight": ("transformer.ln_f.weight",),
            "final_norm.bias": ("transformer.ln_f.bias",),
            "lm_head": ("lm_head.weight",),
        },
        conv1d=True,
        ignored_suffixes=(".attn.bias", ".attn.masked_bias"),
    ),
    # BertModel checkpoints have no prefix; BertFor* ones prefix "bert." (the loader tries both).
    "bert": _FamilyNames(
        layer_prefix="encoder.layer.{i}.",
        linears=(
            ("attention.self.query", "q"),
            ("attention.self.key", "k"),
            ("attention.self.value", "v"),
            ("attention.output.dense", "o"),
            ("intermediate.dense", "up"),
            ("output.dense", "down"),
        ),
        norms=("attention.output.LayerNorm", "output.LayerNorm"),
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
    ),
}


def _has_bias(arch: Arch, kind: LinearKind) -> bool:
    if kind == "o":
        return arch.out_bias
    if kind in ("gate", "up", "down"):
        return arch.mlp_bias
    return arch.qkv_bias  # q, k, v and the fused qkv layouts


def name_map(arch: Arch) -> NameMap:
    names = _FAMILY_NAMES[arch.family]
    absent: set[str] = set()
    if not arch.final_norm:
        absent |= {"final_norm.weight", "final_norm.bias"}
    if arch.word_dim == arch.hidden:
        absent |= {"project_in", "project_out"}
    return NameMap(
        layer_prefix=names.layer_prefix,
        linears=tuple(LayerLinear(name, kind, _has_bias(arch, kind)) for name, kind in names.linears),
        norms=(LayerNormWeights(names.norms[0], "attn_norm"), LayerNormWeights(names.norms[1], "mlp_norm")),
        globals_={ours: hf for ours, hf in names.globals_.items() if ours not in absent},
        conv1d=names.conv1d,
        ignored_suffixes=names.ignored_suffixes,
        optional=names.optional + (("lm_head",) if arch.tie_embeddings else ()),
    )
