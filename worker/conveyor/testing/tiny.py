"""Tiny random-weight HF checkpoints of every supported family, for tests and ``make run``.

``save_tiny(family, dir)`` writes what ``save_pretrained`` writes (config.json + model.safetensors) plus
a small byte-level BPE tokenizer trained offline with the ``tokenizers`` library, so text prompts work
without a download. Weights are random but seeded; ``initializer_range`` is larger than HF's default so
the logits are peaked enough that greedy decoding does not hinge on rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "mistral", "qwen2", "gpt_neox", "opt", "gpt2")
VOCAB = 320
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a pipeline moves micro-batches through its stages while every stage keeps busy",
    "tensor parallel ranks split each layer and meet in one all-reduce",
    "hello world, conveyor runs models too large for one GPU on kubernetes",
    "0123456789 + - * / = ( ) [ ] { } . , ; : ! ?",
]


@dataclass(frozen=True)
class Shape:
    """A model's sizes in family-neutral names (``hf_config`` spells them the way each family does)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int = 0  # grouped-query attention (Llama, Mistral, Qwen2); 0: as many as heads
    vocab: int = VOCAB
    positions: int = 256


TINY = Shape(hidden=32, intermediate=64, layers=3, heads=4, kv_heads=2)
# GPT-2's MLP is 4 x hidden when n_inner is unset; BERT keeps its 512 positions and has 2 layers.
_TINY_OF_FAMILY = {
    "gpt2": replace(TINY, intermediate=128),
    "bert": replace(TINY, layers=2, positions=512),
}


def hf_config(family: str, shape: Shape | None = None, **overrides: Any) -> Any:
    """The HF config of a ``family`` model of ``shape`` (default: this module's tiny one); ``overrides``
    are HF config fields and win over everything."""
    import transformers as T

    shape = shape or _TINY_OF_FAMILY.get(family, TINY)
    # HF's generic names; GPT-2's config maps them onto n_embd, n_layer, n_head, n_positions.
    kw: dict[str, Any] = {
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "max_position_embeddings": shape.positions,
        "initializer_range": 0.3,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[family]
        kw.update(
            intermediate_size=shape.intermediate,
            num_key_value_heads=shape.kv_heads or shape.heads,
            tie_word_embeddings=family == "qwen2",
        )
        if family == "mistral":
            kw["sliding_window"] = 8  # shorter than prompt + output: the window is exercised
        if family == "llama":
            kw["head_dim"] = shape.hidden // shape.heads  # written out, as Llama 3 checkpoints do
    elif family == "gpt_neox":
        cls = T.GPTNeoXConfig
        kw.update(
            intermediate_size=shape.intermediate,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        )
    elif family == "opt":
        cls = T.OPTConfig
        # OPT-350m's shape: post-norm, project_in/out between a narrower embedding and the layers.
        kw.update(
            ffn_dim=shape.intermediate,
            word_embed_proj_dim=shape.hidden // 2,
            do_layer_norm_before=False,
            init_std=0.3,
            pad_token_id=0,
        )
    elif family == "gpt2":
        cls = T.GPT2Config
        kw["n_inner"] = shape.intermediate
    elif family == "bert":
        cls = T.BertConfig
        kw.update(intermediate_size=shape.intermediate, pad_token_id=0)
    else:
        raise ValueError(f"no tiny config for family {family!r}; known: {FAMILIES + ('bert',)}")
    return cls(**{**kw, **overrides})


def build_tokenizer(vocab_size: int = VOCAB) -> Any:
    """A byte-level BPE tokenizer trained on a few sentences (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A random-weight HF model of ``family`` (in memory)."""
    import transformers as T

    config = hf_config(family, **overrides)
    torch.manual_seed(seed)
    auto = T.AutoModel if family == "bert" else T.AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="eager")
    return model.float().eval()


def save_tiny(
    family: str, directory: str | Path, seed: int = 0, tokenizer: bool = True, **overrides: Any
) -> Path:
    """Write a tiny random-weight checkpoint of ``family`` (and a tokenizer) to ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_model(family, seed, **overrides)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer:
        build_tokenizer(model.config.vocab_size).save_pretrained(out)
    return out
