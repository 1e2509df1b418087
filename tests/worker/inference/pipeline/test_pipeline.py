"""Multi-process (gloo) generation on tiny random-weight checkpoints of every family: greedy tokens equal
HF ``generate`` token for token, and seeded sampling gives the same tokens for every layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conveyor.inference.pipeline.generate import Request, SchedulerHooks, run_generation
from conveyor.inference.pipeline.sampling import SamplingParams
from conveyor.testing.reference import one_process_rank
from conveyor.testing.tiny import FAMILIES, save_tiny

from tests.worker.inference.generation import output_ids
from tests.worker.inference.launch import run_ranks

# Prompts of different lengths in one batch; more prompts than lanes, so sequences join mid-run.
PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    [20, 21, 22],
    [30, 31, 32, 33, 34, 35, 36],
    [40] * 5,
    [50, 60],
]
NEW_TOKENS = 8
SAMPLINGS = {
    "greedy": {"stop_token_ids": [2]},
    "sampled": {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.3, "seed": 7},
}
# Every family at stages and tensor parallelism together (2, 2); the fused-qkv layouts under pure tensor
# parallelism (1, 2); Llama at every layout of the matrix; GPT-2 (learned positions, tied head)
# under pure pipelining. Kept small for a shared 2-core machine: each launch costs process start-up.
LAYOUTS = {
    (2, 1): ("llama", "gpt2"),
    (3, 1): ("llama", "gpt2"),
    (1, 2): ("llama", "gpt_neox", "gpt2"),
    (2, 2): FAMILIES,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: str(save_tiny(f, root / f, tokenizer=False)) for f in FAMILIES}


@pytest.fixture(scope="module")
def hf_greedy(models: dict[str, str]) -> dict[str, list[list[int]]]:
    """HF generate, one prompt at a time (no padding), in this process."""
    import transformers as T

    refs = {}
    for family, d in models.items():
        hf = T.AutoModelForCausalLM.from_pretrained(d).eval()
        refs[family] = [
            hf.generate(
                torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=2, pad_token_id=0
            )[0, len(p) :].tolist()
            for p in PROMPTS
        ]
    return refs


@pytest.fixture(scope="module")
def single_sampled(models: dict[str, str]) -> dict[str, list[list[int]]]:
    return {f: single_process(d, SAMPLINGS["sampled"]) for f, d in models.items()}


def single_process(model_dir: str, fields: dict, prefill_chunk: int = 2048) -> list[list[int]]:
    params = SamplingParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    model, peers = one_process_rank(model_dir, lanes=4, max_len=48)
    requests = [Request(i, p, NEW_TOKENS) for i, p in enumerate(PROMPTS)]
    got = output_ids(model, peers, params, requests, lanes_per_micro_batch=4, prefill_chunk=prefill_chunk)
    return [got[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("family", FAMILIES)
def test_single_process_greedy_matches_hf(models, hf_greedy, family):
    assert single_process(models[family], SAMPLINGS["greedy"]) == hf_greedy[family]


# Llama; Mistral (a sliding window of 8, shorter than the longest prompt); GPT-2 (learned positions).
@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_long_prompts_prefilled_in_chunks_give_the_same_tokens(models, hf_greedy, single_sampled, family):
    """Chunks of 3 tokens: prompts of 5, 7 and 11 tokens go in 2-4 chunks, one a turn, while the other
    lanes decode; greedy equals HF, and sampling with a repetition penalty equals the unchunked run."""
    assert single_process(models[family], SAMPLINGS["greedy"], prefill_chunk=3) == hf_greedy[family]
    assert single_process(models[family], SAMPLINGS["sampled"], prefill_chunk=3) == single_sampled[family]


@pytest.mark.integration
@pytest.mark.parametrize("stages,tensor_parallel", list(LAYOUTS))
def test_layouts_match_hf_and_single_process_sampling(
    models, hf_greedy, single_sampled, tmp_path: Path, stages, tensor_parallel
):
    families = LAYOUTS[(stages, tensor_parallel)]
    case = {
        "stages": stages,
        "tensor_parallel": tensor_parallel,
        "models": {f: models[f] for f in families},
        "prompts": PROMPTS,
        "max_new_tokens": NEW_TOKENS,
        "samplings": SAMPLINGS,
        "micro_batches": stages,
        "lanes": 2 * stages,
        # (2, 2): long prompts in chunks of 4 (later chunks extend the cache across stages and ranks)
        "prefill_chunk": 4 if (stages, tensor_parallel) == (2, 2) else 2048,
        "out": str(tmp_path / "out.json"),
    }
    (tmp_path / "case.json").write_text(json.dumps(case))
    run_ranks(
        stages * tensor_parallel, ["-m", "tests.worker.inference.rank_main", str(tmp_path / "case.json")]
    )
    results = json.loads((tmp_path / "out.json").read_text())
    for family in families:
        assert results[family]["greedy"] == hf_greedy[family], (
            f"{family} greedy at {stages}x{tensor_parallel}"
        )
        sampled = single_sampled[family]
        assert results[family]["sampled"] == sampled, f"{family} sampled at {stages}x{tensor_parallel}"
        assert sampled != hf_greedy[family]


def test_stop_strings_cut_text_and_bf16_runs(tmp_path: Path) -> None:
    from conveyor.inference.job import load_tokenizer

    d = save_tiny("llama", tmp_path / "m")
    tok = load_tokenizer(str(d))

    def run(stop: tuple[str, ...], dtype: torch.dtype) -> dict:
        model, peers = one_process_rank(d, dtype=dtype, lanes=2, max_len=40)
        got: dict = {}
        run_generation(
            model,
            peers,
            SamplingParams(stop=stop),
            [Request(0, tok("hello world")["input_ids"], 12)],
            micro_batches=1,
            lanes_per_micro_batch=2,
            device=torch.device("cpu"),
            tokenizer=tok,
            hooks=SchedulerHooks(on_result=lambda r: got.__setitem__(r.id, r)),
        )
        return got

    full = run((), torch.float32)[0]
    assert full.finish_reason == "length" and len(full.output_ids) == 12
    # A stop string: the text of a later token that does not occur before it.
    k, stop = next(
        (k, piece)
        for k in range(1, 11)
        if (piece := tok.decode(full.output_ids[k : k + 1])).strip()
        and "\ufffd" not in piece
        and piece not in tok.decode(full.output_ids[:k])
    )
    stopped = run((stop,), torch.float32)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.output_ids == full.output_ids[: k + 1]  # the tokens are kept, up to the stop string
    assert stop not in stopped.text and full.text.startswith(stopped.text)
    # bf16: the greedy tokens of HF's bf16 model, one process (same dtype, another implementation; on
    # this checkpoint they are also the fp32 tokens, measured: its large init keeps logits peaked).
    import transformers as T

    ids = tok("hello world")["input_ids"]
    hf = T.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    reference = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert run((), torch.bfloat16)[0].output_ids == reference[0, len(ids) :].tolist()


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_sequences_leave_at_stop_tokens_and_others_join_their_lanes(
    tmp_path: Path, micro_batches: int
) -> None:
    """The host reads tokens one step late, so a sequence that stops runs one extra step: that step's
    token must be dropped, and a sequence admitted into the freed lane must be unaffected by it."""
    d = save_tiny("llama", tmp_path / "m")
    model, peers = one_process_rank(d, lanes=2, max_len=40)

    def run(prompts: list[list[int]], stop: tuple[int, ...]) -> dict:
        got: dict = {}
        run_generation(
            model,
            peers,
            SamplingParams(stop_token_ids=stop),
            [Request(i, p, 10) for i, p in enumerate(prompts)],
            micro_batches=micro_batches,
            lanes_per_micro_batch=2 // micro_batches,
            device=torch.device("cpu"),
            hooks=SchedulerHooks(on_result=lambda r: got.__setitem__(r.id, r)),
        )
        return got

    solo = [run([p], ())[0].output_ids for p in PROMPTS]
    # Stop at the third token of the first prompt's output: it leaves early, the others may or may not.
    stop = solo[0][2]
    want = [o[: o.index(stop) + 1] if stop in o else o for o in solo]
    got = run(PROMPTS, (stop,))
    assert [got[i].output_ids for i in range(len(PROMPTS))] == want
    assert [got[i].finish_reason for i in range(len(PROMPTS))] == [
        "stop" if stop in o else "length" for o in solo
    ]
    assert got[0].finish_reason == "stop" and len(got[0].output_ids) <= 3


def test_a_cache_with_fewer_lanes_than_the_micro_batches_is_refused(models: dict[str, str]) -> None:
    model, peers = one_process_rank(models["llama"], lanes=3, max_len=48)
    requests = [Request(i, p, 2) for i, p in enumerate(PROMPTS[:3])]
    with pytest.raises(ValueError, match="need a KV cache of 4 lanes; this stage's has 3"):
        output_ids(model, peers, SamplingParams(), requests, micro_batches=2, lanes_per_micro_batch=2)
