"""On a GPU: an eager stage model (a batch job's prompt passes) with elementwise.py's kernels gives the
logits of torch's ops within bf16 rounding, the kernels compile at warm-up and never after it whatever
the prompt lengths, a captured decode step keeps torch's ops, prompts packed in one row (flash
attention's variable-length kernel) give the padded pass's logits, and no prompt pass runs SDPA's
cuDNN backend, which builds a plan for every new shape (skipped without a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conveyor.inference.kernels import elementwise, packed_attention
from conveyor.inference.kernels.cuda_graphs import CompiledStage, CompileOptions
from conveyor.testing.reference import one_process_rank
from conveyor.testing.tiny import save_tiny

pytestmark = pytest.mark.gpu


def test_eager_passes_take_the_kernels_compiled_at_warm_up_and_give_torchs_logits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = save_tiny("llama", tmp_path, tokenizer=False, initializer_range=0.02)
    dev = torch.device("cuda")
    model, _ = one_process_rank(d, dtype=torch.bfloat16, device=dev, lanes=4, max_len=512)
    stage = CompiledStage.attach(model, CompileOptions(compile_prompts=False))
    stage.warm_up(4)
    assert elementwise.compiled_variants() >= 3  # norm, gate, rotary: made by warm-up's eager pass
    taken: list[int] = []
    serves = elementwise.serves

    def counting(*tensors: torch.Tensor) -> bool:
        taken.append(1)
        return serves(*tensors)

    gen = torch.Generator().manual_seed(0)
    for n, s in [(1, 1), (3, 37), (2, 300), (4, 129)]:
        ids = torch.randint(3, 100, (n, s), generator=gen).to(dev)
        positions, lanes = torch.arange(s, device=dev).expand(n, s), torch.arange(n, device=dev)
        with torch.inference_mode():
            monkeypatch.setattr(elementwise, "serves", counting)
            fused = stage.prompt(ids, positions, lanes, prefill=True).float()
            monkeypatch.setattr(elementwise, "serves", lambda *t: False)
            plain = stage.prompt(ids, positions, lanes, prefill=True).float()
        scale = plain.abs().max().item()
        assert (fused - plain).abs().max().item() <= 0.02 * scale, (n, s)
    assert taken, "the kernels were never asked"
    assert stage.count_late_kernels() == 0
    assert stage.counts["late_compiles"] == 0 and stage.counts["late_captures"] == 0


def test_nothing_is_served_while_a_graph_is_captured() -> None:
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    assert elementwise.serves(x)
    assert not elementwise.serves(x.float())  # float32 stays on torch's exact ops
    assert not elementwise.serves(x.view(-1)[1:193].view(3, 64))  # unaligned: another variant: torch
    graph = torch.cuda.CUDAGraph()
    answers = []
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        answers.append(elementwise.serves(x))
    assert answers == [False]


def test_packed_prompts_give_the_padded_passs_logits(tmp_path: Path) -> None:
    d = save_tiny("llama", tmp_path, tokenizer=False, initializer_range=0.02)
    dev = torch.device("cuda")
    model, _ = one_process_rank(d, dtype=torch.bfloat16, device=dev, lanes=4, max_len=512)
    assert model.cache is not None
    lengths, scratch = [300, 17, 1, 129], model.cache.scratch_position
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (4, 300), generator=gen).to(dev)
    positions = torch.full((4, 300), scratch, device=dev)
    for i, n in enumerate(lengths):
        positions[i, :n] = torch.arange(n, device=dev)
    lanes = torch.arange(4, device=dev)
    out = []
    for attend in (None, packed_attention.attend):
        model.packed_attention = attend
        with torch.inference_mode():
            first = model(ids, positions, prefill=True, lanes=lanes).float()
            at = torch.tensor(lengths, device=dev)[:, None]
            step = model(torch.full((4, 1), 7, device=dev), at, lanes=lanes, kv_len=512).float()
        out.append((first, step))
    for want, got in zip(out[0], out[1], strict=True):
        assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()
    assert not packed_attention._warned, packed_attention._warned  # flash's kernel served


def test_prompt_passes_keep_sdpa_off_cudnn(tmp_path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    d = save_tiny("llama", tmp_path, tokenizer=False, initializer_range=0.02)
    dev = torch.device("cuda")
    model, _ = one_process_rank(d, dtype=torch.bfloat16, device=dev, lanes=4, max_len=512)

    def kernels(options: CompileOptions) -> list[str]:
        stage = CompiledStage.attach(model, options)
        with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.inference_mode():
            for n, s in [(1, 37), (1, 301), (3, 64)]:  # one prompt (SDPA) and several (packed)
                ids = torch.randint(3, 100, (n, s), device=dev)
                positions, lanes = torch.arange(s, device=dev).expand(n, s), torch.arange(n, device=dev)
                stage.prompt(ids, positions, lanes, prefill=True)
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    plain = CompileOptions(cuda_graphs=False, compile=False, compile_prompts=False)
    assert not [k for k in kernels(plain) if "cudnn" in k.lower()]
