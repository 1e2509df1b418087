"""Tensor-parallel fine-tuning (stages x tensorParallel x replicas) against HF's own single-process model.

- Every causal family split over 2 tensor ranks (the embedding and head split over the vocabulary, each
  rank's logits [n, S, vocab / 2]): the loss, every parameter's gradient (gathered whole,
  under HF's names) and the global gradient norm equal HF's; replicated parameters' gradients are equal
  on both tensor ranks; the shards gathered back are the original checkpoint, bit for bit.
- A tiny random Llama (GQA: 4 heads, 2 KV heads) fine-tuned for 12 steps with (stages, tensorParallel,
  replicas) in (1, 2, 1), (2, 2, 1) (with activation checkpointing), (1, 2, 2): per-step losses and
  gradient norms equal HF training with the same data order, AdamW and clipping; the export loads in HF
  and gives the trained model's logits.
- Stopped after step 7 and restarted: it resumes from the step-5 checkpoint (each rank its shard) and
  continues the same curve; the one-process export of that TP checkpoint equals the job's export (resuming
  with another layout: test_tensor_parallel_reshard.py).
- Through the pod entry point (one pod, 2 tensor ranks): SIGKILLed after step 6 and restarted, it continues
  the same curve; a batch inference job with tensorParallel 2 on the export gives HF's greedy tokens.
- A tensorParallel that does not divide the heads, KV heads or MLP width is refused, naming the field: by
  the pods' pre-flight before any rank starts, and by the rank before any weight is read.
"""

from __future__ import annotations

import pytest
import torch
from conveyor.inference.model.families import load_arch, name_map
from conveyor.inference.pipeline.tensor_parallel import TensorParallelError
from conveyor.testing.tiny import FAMILIES, save_tiny
from conveyor.train.tensor_parallel import check_tensor_parallel
from safetensors.torch import load_file

from tests.worker.pipe.harness import run_ranks
from tests.worker.train.ranks import fine_tune_outcome_rank, tensor_parallel_gradients_rank
from tests.worker.train.reference import (
    assert_output_is_the_exports_greedy_tokens,
    hf_train,
    spec_dict,
    write_dataset,
)

pytestmark = pytest.mark.integration
STEPS = 12
TOL = 2e-4


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_over_two_tensor_ranks_equal_hf(tmp_path, family):
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny(family, tmp_path / family, tokenizer=False)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()  # eval: no dropout
    loss = hf(ids, labels=ids).loss
    loss.backward()
    expected = float(loss.detach())
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    hf_norm = float(torch.nn.utils.get_total_norm([g for g in hf_grads.values()]))

    # a family's other names for one tensor (the checkpoint's name is the one written back)
    aliases = {hf: names for names in name_map(load_arch(model_dir)).globals_.values() for hf in names}
    per_rank = run_ranks(tensor_parallel_gradients_rank, 2, str(model_dir), ids, timeout=300)
    original = load_file(str(model_dir / "model.safetensors"))
    vocab = load_arch(model_dir).vocab_size
    for rank, (got, gaps, norm, weights, grads, logits) in enumerate(per_rank):
        # vocabulary-parallel head: each rank holds its half of the logits, never the whole [tokens, vocab]
        assert logits == (*ids.shape, vocab // 2), rank
        assert got == pytest.approx(expected, rel=1e-5), rank
        assert gaps == {}, f"rank {rank}: replicated gradients differ across the tensor group: {gaps}"
        assert norm == pytest.approx(hf_norm, rel=1e-5), rank
        assert set(weights) == set(original)
        for name, tensor in original.items():
            assert torch.equal(weights[name], tensor), name
        for name, grad in hf_grads.items():
            stored = next(n for n in aliases.get(name, (name,)) if n in grads)  # GPT-NeoX: embed_out
            torch.testing.assert_close(grads[stored], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    model = save_tiny("llama", root / "model")
    data = write_dataset(root / "data.jsonl")
    norms: list[float] = []
    losses, trained = hf_train(model, data, steps=STEPS, schedule=False, grad_norms=norms)
    return model, data, losses, norms, trained


def tp_spec(model, data, ckpt, stages, tensor_parallel, replicas):
    spec = spec_dict(model, data, ckpt, stages, replicas, steps=STEPS)
    spec["parallelism"]["tensorParallel"] = tensor_parallel
    spec["train"]["scheduler"] = None  # a constant learning rate, as the reference here
    return spec


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "stages,tensor_parallel,replicas,recompute", [(1, 2, 1, False), (2, 2, 1, True), (1, 2, 2, False)]
)
def test_losses_equal_hf_training(llama, tmp_path, stages, tensor_parallel, replicas, recompute):
    model, data, ref_losses, ref_norms, trained = llama
    spec = tp_spec(model, data, tmp_path / "ckpt", stages, tensor_parallel, replicas)
    # activation checkpointing: the recomputed forward repeats its all-reduces inside the backward
    spec["train"]["activationCheckpointing"] = recompute
    world = stages * tensor_parallel * replicas
    per_rank = run_ranks(fine_tune_outcome_rank, world, spec, str(tmp_path / "ckpt"), timeout=800)
    for rank, (losses, norms, _) in enumerate(per_rank):
        assert [losses[s] for s in range(1, STEPS + 1)] == pytest.approx(ref_losses, rel=TOL, abs=TOL), rank
        assert [norms[s] for s in range(1, STEPS + 1)] == pytest.approx(ref_norms, rel=TOL), rank
    assert ref_norms[0] > 1.0, "clipping (at 1.0) must act, so that a wrong norm would show"
    assert ref_losses[-1] < ref_losses[0] - 0.5, "the run must actually learn"

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt" / "export")).float().eval()
    ids = torch.tensor([[5, 17, 99, 230, 41, 8, 77]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained(ids).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.timeout(900)
def test_stopped_and_restarted_continues_the_curve(llama, tmp_path):
    from conveyor.train.export_checkpoint import export_checkpoint
    from transformers import AutoModelForCausalLM

    model, data, ref_losses, _, _ = llama
    ckpt = tmp_path / "ckpt"
    spec = tp_spec(model, data, ckpt, 2, 2, 1)
    with pytest.raises(AssertionError, match="stopped after step 7"):
        run_ranks(fine_tune_outcome_rank, 4, spec, str(ckpt), 7, timeout=600)
    assert (ckpt / "latest").read_text().strip() == "step-5"
    assert not (ckpt / "export").exists()

    per_rank = run_ranks(fine_tune_outcome_rank, 4, spec, str(ckpt), timeout=600)
    for rank, (losses, _, resumed) in enumerate(per_rank):
        assert resumed == 5, rank
        assert sorted(losses) == list(range(6, STEPS + 1))
        got = [losses[s] for s in range(6, STEPS + 1)]
        assert got == pytest.approx(ref_losses[5:], rel=TOL, abs=TOL), rank

    # The one-process export of the last (tensor-parallel) checkpoint joins the shards: the job's export.
    out = export_checkpoint(model, ckpt, tmp_path / "from-checkpoint")
    job = AutoModelForCausalLM.from_pretrained(str(ckpt / "export")).eval()
    joined = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    for (name, a), (_, b) in zip(job.state_dict().items(), joined.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "overrides,what",
    [
        ({"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 48}, "num_key_value_heads 3"),
        ({"intermediate_size": 65}, "intermediate size 65"),
    ],
)
def test_a_tensor_parallel_that_does_not_divide_is_refused(tmp_path, overrides, what):
    arch = load_arch(save_tiny("llama", tmp_path / "m", tokenizer=False, **overrides))
    with pytest.raises(TensorParallelError, match=rf"spec\.parallelism\.tensorParallel: .*{what}.*Use a"):
        check_tensor_parallel(arch, 2)
    check_tensor_parallel(arch, 1)


def test_the_pods_refuse_a_non_dividing_tensor_parallel_before_any_rank_starts(tmp_path):
    from conveyor.inference.validate import InputError, needs_preflight, preflight
    from conveyor.spec import parse_spec

    model = save_tiny("llama", tmp_path / "model", tokenizer=False)  # 4 heads, 2 KV heads
    doc = tp_spec(model, tmp_path / "data.jsonl", tmp_path / "ckpt", 1, 3, 1)
    spec = parse_spec(doc)
    assert needs_preflight(spec)
    with pytest.raises(
        InputError, match=r"spec\.parallelism\.tensorParallel: .*num_key_value_heads 2 is not"
    ):
        preflight(spec)
    doc["parallelism"]["tensorParallel"] = 2
    preflight(parse_spec(doc))


@pytest.mark.timeout(900)
def test_pods_killed_resume_then_a_tensor_parallel_inference_job_on_the_export(llama, tmp_path):
    # Through the pod entry point (`conveyor worker`, 2 tensor ranks in one pod): SIGKILL after step 6,
    # restart, the same curve to the end; then a batch inference job with tensorParallel 2 on the export
    # gives HF's greedy tokens of the exported model, which are the trained model's.
    import json
    import time

    from conveyor.spec import parse_spec

    from tests.worker.train.test_restart_and_serve import Lines, losses, start_pods

    model, data, ref_losses, _, trained = llama
    spec = parse_spec(tp_spec(model, data, tmp_path / "ckpt", 1, 2, 1))
    procs = start_pods(spec, tmp_path, restart=0)
    first = Lines(procs[0])
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and max(losses(first), default=0) < 6:
        assert procs[0].poll() is None, "".join(first.lines[-40:])
        time.sleep(0.02)
    procs[0].kill()  # SIGKILL: the ranks die with their worker
    procs[0].wait()
    first.thread.join(5)
    killed_at = max(losses(first))
    assert 6 <= killed_at < STEPS, killed_at

    procs = start_pods(spec, tmp_path, restart=1)
    second = Lines(procs[0])
    assert procs[0].wait(timeout=400) == 0, "".join(second.lines[-60:])
    second.thread.join(5)
    resumed = second.records("checkpoint loaded")[0]["step"]
    assert resumed in (5, 10), resumed
    after, before = losses(second), losses(first)
    assert sorted(after) == list(range(resumed + 1, STEPS + 1))
    for step in range(1, STEPS + 1):
        got = after.get(step, before.get(step))
        assert got == pytest.approx(ref_losses[step - 1], rel=TOL, abs=TOL), step

    export = tmp_path / "ckpt" / "export"
    prompts = [[5, 17, 99, 230], [41, 8, 77]]
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": i, "input_ids": p}) + "\n" for i, p in enumerate(prompts))
    )
    job = parse_spec(
        {
            "mode": "inference",
            "device": "cpu",
            "model": {"path": str(export), "dtype": "float32"},
            "parallelism": {"stages": 1, "tensorParallel": 2},
            "checkpoint": {"path": str(tmp_path / "infer-ckpt")},
            "inference": {
                "input": str(tmp_path / "in.jsonl"),
                "output": str(tmp_path / "out.jsonl"),
                "maxNewTokens": 6,
            },
        }
    )
    procs = start_pods(job, tmp_path, restart=0)
    out = procs[0].communicate(timeout=300)[0]
    assert procs[0].returncode == 0, out[-3000:]
    assert_output_is_the_exports_greedy_tokens(tmp_path / "out.jsonl", export, trained, prompts)
