"""Single-process checks: our model's logits equal HF's for every family (and variants), the loader
refuses checkpoints that do not match their config, unsupported families and layouts are refused with
clear messages, and the sampler's randomness does not depend on how sequences are grouped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conveyor.inference.model.families import UnsupportedModelError, load_arch, name_map
from conveyor.inference.model.loader import CheckpointError, Shard, load_stage, stage_layers
from conveyor.inference.pipeline.sampling import SamplingParams, counter_uniform, filter_top_k_top_p, sample
from conveyor.inference.pipeline.tensor_parallel import TensorParallelError, plan_layer
from conveyor.testing.tiny import save_tiny, tiny_model
from safetensors.torch import load_file, save_file

VARIANTS = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "gpt_neox": {},
    "gpt_neox-sequential": {"use_parallel_residual": False},
    "opt": {},
    "opt-prenorm": {"do_layer_norm_before": True, "word_embed_proj_dim": 32},
    "gpt2": {},
    "llama-tied-llama3-rope": {
        "tie_word_embeddings": True,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_hf(variant: str, tmp_path: Path) -> None:
    import transformers as T

    family = variant.split("-")[0]
    d = save_tiny(family, tmp_path, tokenizer=False, **VARIANTS[variant])
    hf = T.AutoModelForCausalLM.from_pretrained(d).eval()
    arch = load_arch(d)
    ids = torch.randint(3, arch.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    model = load_stage(d, arch)
    model.setup_cache(2, 20, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        ref = hf(ids).logits[:, -1]
        ours = model(ids, torch.arange(13).expand(2, 13))
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_pipeline_stages_compose_to_the_whole_model(tmp_path: Path) -> None:
    d = save_tiny("gpt2", tmp_path, tokenizer=False)
    arch = load_arch(d)
    ids, pos = torch.tensor([[5, 6, 7, 8]]), torch.arange(4)[None]
    whole = load_stage(d, arch)
    whole.setup_cache(1, 8, torch.float32, torch.device("cpu"))
    x = ids
    for s in range(3):
        part = load_stage(d, arch, stages=3, stage=s)
        assert [k for k in part.state_dict() if k.startswith("layers.")] == [
            k for k in whole.state_dict() if k.startswith("layers.0.")
        ]  # one layer each, nothing else but its ends
        assert hasattr(part, "embed") == (s == 0) and hasattr(part, "lm_head") == (s == 2)
        part.setup_cache(1, 8, torch.float32, torch.device("cpu"))
        with torch.no_grad():
            x = part(x, pos)
    with torch.no_grad():
        torch.testing.assert_close(x, whole(ids, pos))


def test_stage_layers_split_evenly() -> None:
    assert [list(stage_layers(7, 3, s)) for s in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match="only 2 layers"):
        stage_layers(2, 3, 0)


def test_missing_unexpected_and_misshapen_tensors_are_refused(tmp_path: Path) -> None:
    d = save_tiny("llama", tmp_path, tokenizer=False)
    arch = load_arch(d)
    tensors = load_file(d / "model.safetensors")
    broken = dict(tensors)
    del broken["model.layers.1.mlp.up_proj.weight"]
    broken["model.layers.0.extra.weight"] = torch.zeros(2)
    broken["model.norm.weight"] = torch.zeros(7)
    save_file(broken, d / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_stage(d, arch)
    msg = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "model.layers.0.extra.weight" in msg
    assert "model.norm.weight has shape [7]" in msg


def test_unsupported_family_is_named_with_the_supported_list(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(UnsupportedModelError, match="'mamba'.*supported families: llama, mistral, qwen2"):
        load_arch(tmp_path)


def test_indivisible_heads_fail_before_loading(tmp_path: Path) -> None:
    d = save_tiny("llama", tmp_path, tokenizer=False)  # 4 heads, 2 kv heads
    (d / "model.safetensors").write_bytes(b"")  # reading a weight would fail differently
    with pytest.raises(
        TensorParallelError, match="num_key_value_heads 2 is not divisible by tensorParallel 4"
    ):
        load_stage(d, load_arch(d), shard=Shard(0, 4))


def test_policy_overrides_detection_and_is_checked() -> None:
    arch = load_arch_of("llama")
    names = name_map(arch)
    detected = plan_layer(arch, names)
    assert {n for n, r in detected.items() if r == "row"} == {"self_attn.o_proj", "mlp.down_proj"}
    explicit = plan_layer(arch, names, {"LlamaDecoderLayer": ("self_attn.o_proj", "mlp.down_proj")})
    assert explicit == detected
    with pytest.raises(TensorParallelError, match="mlp.down_proj must be row-parallel"):
        plan_layer(arch, names, {"LlamaDecoderLayer": ("self_attn.o_proj",)})
    with pytest.raises(TensorParallelError, match="not linears of that layer"):
        plan_layer(arch, names, {"LlamaDecoderLayer": ("self_attn.o_proj", "mlp.down_proj", "mlp.nope")})
    with pytest.raises(TensorParallelError, match="key the policy by 'LlamaDecoderLayer'"):
        plan_layer(arch, names, {"GPT2Block": ("attn.c_proj",)})


def load_arch_of(family: str):
    from conveyor.inference.model.families import arch_from_config

    return arch_from_config(tiny_model(family).config)


def test_sampling_noise_depends_only_on_seed_sequence_and_step() -> None:
    keys, steps = torch.tensor([11, 22, 33]), torch.tensor([0, 5, 9])
    together = counter_uniform(7, keys, steps, 50)
    alone = torch.cat([counter_uniform(7, keys[i : i + 1], steps[i : i + 1], 50) for i in range(3)])
    assert torch.equal(together, alone)
    assert not torch.equal(together, counter_uniform(8, keys, steps, 50))
    # Exactly the documented hash, recomputed here in plain Python integers.
    want = [[_uniform_reference(7, k, s, t) for t in range(50)] for k, s in zip([11, 22, 33], [0, 5, 9])]
    assert torch.equal(together, torch.tensor(want, dtype=torch.float32))
    # Uniform on (0, 1) and never 0 or 1 (Gumbel noise takes -log(-log(u))): 64 x 1024 draws in 16 bins.
    many = counter_uniform(3, torch.arange(64), torch.arange(64), 1024)
    assert many.min() > 0 and many.max() < 1
    counts = torch.histc(many, bins=16, min=0, max=1)
    expected = many.numel() / 16
    assert ((counts - expected).abs() < 4 * expected**0.5).all(), counts  # 4 standard deviations


def _fmix32(h: int) -> int:
    """murmur3's 32-bit finaliser on a Python int."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _uniform_reference(seed: int, key: int, step: int, token: int) -> float:
    """sampling.counter_uniform for one (seed, key, step, token): the hash's top 24 bits, centred."""
    k = _fmix32(_fmix32(_fmix32(seed) ^ key) ^ step)
    h = _fmix32(k ^ _fmix32(token + 0x9E3779B9))
    return ((h >> 8) + 0.5) / (1 << 24)


def test_sampling_follows_the_distribution_and_filters() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(4000, 3)
    keys = torch.arange(4000)
    drawn = sample(logits, SamplingParams(temperature=1.0, seed=1), keys, torch.zeros(4000, dtype=torch.long))
    freq = torch.bincount(drawn, minlength=3).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03, rtol=0)
    filtered = filter_top_k_top_p(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), top_k=3, top_p=0.7)
    assert torch.isfinite(filtered).tolist() == [[True, True, False, False]]
    seen = torch.tensor([[True, False]])
    greedy = SamplingParams(repetition_penalty=10.0)
    assert sample(torch.tensor([[2.0, 1.0]]), greedy, keys[:1], keys[:1], seen).item() == 1


def test_a_top_p_too_small_for_float32_keeps_the_most_likely_token() -> None:
    """top_p below float32's least positive number (1.4e-45) rounds to 0 in the comparison, which then
    dropped every token, the most likely too: every logit -inf, and the draw was token 0 whatever the
    model said (a client's top_p may be any number in (0, 1])."""
    logits = torch.tensor([[1.0, 2.0, 3.0, -1.0], [0.5, -2.0, 0.0, 4.0]])
    keys = torch.zeros(2, dtype=torch.long)
    for top_p in (1e-300, 1e-46, 1e-44, 0.01):
        assert torch.isfinite(filter_top_k_top_p(logits, 0, top_p)).sum(dim=-1).tolist() == [1, 1], top_p
        params = SamplingParams(temperature=1.0, top_p=top_p, seed=7)
        assert sample(logits, params, keys, keys).tolist() == [2, 3], top_p


def test_a_temperature_too_small_for_float32_samples_as_greedy() -> None:
    """logits / T overflows float32 long before T reaches 0: at 1e-40 every positive logit was +inf and
    the draw the first of them (a client's temperature may be any number in [0, 2])."""
    logits = torch.tensor([[1.0, 2.0, 3.0, -1.0]])
    keys = torch.zeros(1, dtype=torch.long)
    for temperature in (1e-40, 1e-300, 1e-6):
        params = SamplingParams(temperature=temperature, seed=7)
        assert sample(logits, params, keys, keys).item() == 2, temperature
