"""The AutoTP GPU benchmarks' logic on the CPU: the batch search against a known limit, the rank groups'
crash and hang reports, and both scripts end to end on gloo CPU processes (our side of the DeepSpeed
comparison against the single-process model; the memory table with the cap applied to modeled bytes,
where the largest batch is known exactly)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.autotp_deepspeed import compare, markdown
from benchmarks.autotp_memory import kv_bytes_per_token, largest_batch
from benchmarks.ranks import layout, run_group
from tests.conftest import ROOT, subprocess_env


@pytest.mark.parametrize("limit", [1, 2, 3, 37, 64, 65, 1000])
def test_largest_batch_finds_the_limit(limit: int) -> None:
    seen: list[int] = []

    def fits(b: int) -> bool:
        seen.append(b)
        return b <= limit

    found = largest_batch(fits, max_batch=4096)
    assert found["largest"] == limit and found["first_failing"] == limit + 1
    assert not found["capped"] and not found["stopped_by_deadline"]
    # doubling then bisection: about 2 log2(limit) tries, never a batch twice
    assert len(seen) == len(set(seen)) <= 2 * limit.bit_length() + 1, seen


def test_largest_batch_capped_none_and_precision() -> None:
    assert largest_batch(lambda b: True, max_batch=100)["largest"] == 100
    assert largest_batch(lambda b: True, max_batch=100)["capped"]
    nothing = largest_batch(lambda b: False, max_batch=100)
    assert nothing["largest"] == 0 and nothing["first_failing"] == 1
    coarse = largest_batch(lambda b: b <= 300, max_batch=4096, precision=0.1)
    assert coarse["largest"] <= 300 < coarse["first_failing"] <= coarse["largest"] * 1.1 + 1


def test_largest_batch_stops_at_the_deadline() -> None:
    def slow(b: int) -> bool:
        time.sleep(0.05)
        return b <= 1000

    found = largest_batch(slow, max_batch=4096, deadline=time.perf_counter() + 0.12)
    assert found["stopped_by_deadline"] and found["largest"] < 1000 and len(found["tries"]) <= 3

    # a try predicted to end past the deadline is not started: batch 2 would take 2 x 0.3 s
    def slower(b: int) -> bool:
        time.sleep(0.3 * b)
        return True

    found = largest_batch(slower, max_batch=4096, deadline=time.perf_counter() + 0.8)
    assert [t["batch"] for t in found["tries"]] == [1] and found["stopped_by_deadline"], found


def test_kv_bytes_per_token_llama2_13b() -> None:
    from benchmarks.common import llama_config

    config = llama_config("llama2-13b")
    # 2 (k, v) x 40 layers x 5120 x 2 bytes = 819,200 bytes a token, split over the heads
    assert kv_bytes_per_token(config, 1, torch.bfloat16) == 819_200
    assert kv_bytes_per_token(config, 4, torch.bfloat16) == 204_800


def _argv(code: str) -> list[str]:
    return ["-c", code]


def test_a_crashing_rank_is_reported_by_its_signal_and_its_peers_are_ended(tmp_path: Path) -> None:
    crash = "import os, signal, time\nif os.environ['RANK'] == '1': os.kill(os.getpid(), signal.SIGSEGV)\ntime.sleep(60)"
    t0 = time.perf_counter()
    group = run_group(_argv(crash), layout(2, "cpu"), tmp_path, "crash", timeout=50)
    assert time.perf_counter() - t0 < 20  # rank 0 was killed, not waited for
    assert group.failure(50) == "crashed: signal 11 (SIGSEGV, rank 1)"
    hang = run_group(_argv("import time; time.sleep(60)"), layout(2, "cpu"), tmp_path, "hang", timeout=1)
    assert hang.failure(1) == "timed out after 1s"
    fine = run_group(_argv("pass"), layout(2, "cpu"), tmp_path, "fine", timeout=30)
    assert fine.failure(30) is None


def _engine_result(logits: torch.Tensor, tokens: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """One engine's saved result against HF's logits ``ref`` and HF's tokens [[3, 4]]."""
    return {
        "status": "ok",
        "kind": "causal",
        "init_inference_s": 0.1,
        "param_fraction": 0.5,
        "ref_logits": ref,
        "ref_tokens": torch.tensor([[3, 4]]),
        "logits": logits,
        "tokens": tokens,
    }


def test_compare_and_table() -> None:
    ref = torch.tensor([[1.0, -4.0, 2.0]])
    tokens = torch.tensor([[3, 4]])
    both = compare(
        "llama",
        2,
        {
            "conveyor": _engine_result(ref + 2**-20, tokens, ref),
            "deepspeed": _engine_result(ref + torch.tensor([[0.0, 0.4, 0.0]]), tokens + 1, ref),
        },
        "float32",
    )
    assert both["conveyor"]["logits_rel_err_vs_hf"] == 2**-22
    assert both["deepspeed"]["logits_rel_err_vs_hf"] == pytest.approx(0.1)
    assert both["conveyor"]["greedy_equal_hf"] and not both["deepspeed"]["greedy_equal_hf"]
    assert both["engines"]["same_hf_reference"] and not both["engines"]["greedy_equal"]
    crashed = compare("bloom", 4, {"conveyor": _engine_result(ref, tokens, ref),
                                   "deepspeed": {"status": "crashed: signal 11 (SIGSEGV, rank 0)"}}, "float32")  # fmt: skip
    assert "engines" not in crashed
    table = markdown([both, crashed], 2e-5).splitlines()
    assert table[2].startswith(
        "| llama | 2 | ok | 2.4e-07 | yes | 50% | MISMATCH | 1.0e-01 | NO | 50% | 1.0e-01 | NO |"
    )
    assert table[3].startswith(
        "| bloom | 4 | ok | 0.0e+00 | yes | 50% | crashed: signal 11 (SIGSEGV, rank 0) |"
    )


def _run(script: str, *args: str, timeout: float = 600) -> None:
    # PYTHONPATH without any deepspeed: the script must say "skipped", not fail
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        env=subprocess_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.integration
def test_deepspeed_comparison_runs_our_side_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "ds.json"
    _run("autotp_deepspeed.py", "--families", "llama,t5,bert", "--tp", "2", "--device", "cpu", "--jobs", "1",
         "--work", str(tmp_path / "work"), "--out", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    assert report["layout"] == {"2": "2 CPU processes over gloo"}
    rows = {r["family"]: r for r in report["rows"]}
    assert set(rows) == {"llama", "t5", "bert"}
    for family, row in rows.items():
        ours = row["conveyor"]
        assert ours["status"] == "ok", ours
        assert ours["logits_rel_err_vs_hf"] <= 2e-5, (family, ours)
        assert ours["greedy_equal_hf"] is (None if family == "bert" else True), (family, ours)
        if report["deepspeed_version"] is None:
            assert row["deepspeed"] == {"status": "skipped: deepspeed not importable"}
    assert "| llama | 2 | ok |" in report["table"]


@pytest.mark.integration
def test_memory_table_finds_the_largest_batch_under_a_modeled_cap(tmp_path: Path) -> None:
    """Tiny Llama (hidden 64, 4 layers, 2 KV heads of 16, bf16), prompt 16 + 8 new tokens, cap 1 MiB
    applied on the CPU to this rank's parameter bytes plus the batch's KV cache: the search must land on
    the exact largest batch, after running ``generate`` at every batch it tried."""
    out = tmp_path / "mem.json"
    cap = 2**20
    _run("autotp_memory.py", "--shape", "tiny", "--ckpt-dir", str(tmp_path / "ckpt"), "--tp", "1,2",
         "--cap-gib", str(cap / 2**30), "--prompt-len", "16", "--new-tokens", "8", "--max-batch", "512",
         "--precision", "0", "--device", "cpu", "--out", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    rows = {r["tp"]: r for r in report["rows"]}
    params = {tp: rows[tp]["ranks"][0]["param_bytes"] for tp in (1, 2)}
    assert report["checkpoint"]["bytes"] == params[1]
    # each rank holds the norms whole and half of everything else (vocabulary-parallel embeddings)
    assert params[1] / 2 < params[2] < params[1] / 2 + 4096, params
    for tp, row in rows.items():
        assert all(r["load_peak_param_bytes"] == r["param_bytes"] == params[tp] for r in row["ranks"]), row
        kv = 2 * 4 * (2 // tp) * 16 * 2 * (16 + 8)  # k and v, 4 layers, this rank's KV heads, bf16, tokens
        assert row["search"]["largest"] == (cap - params[tp]) // kv, row
        assert row["search"]["first_failing"] == row["search"]["largest"] + 1
    assert rows[2]["search"]["largest"] > 2 * rows[1]["search"]["largest"]
    assert "| 2 | 2 CPU processes over gloo |" in report["table"]


@pytest.mark.gpu
def test_our_side_on_a_gpu_with_the_model_already_there(tmp_path: Path) -> None:
    """The script moves the HF model to the GPU before splitting it, as DeepSpeed's examples do: a
    vocabulary slice indexed a CUDA weight with a CPU index (every family failed on the H200 until fixed)."""
    out = tmp_path / "ds.json"
    _run("autotp_deepspeed.py", "--families", "llama,gpt2", "--tp", "2", "--device", "cuda", "--jobs", "1",
         "--engines", "conveyor", "--work", str(tmp_path / "work"), "--out", str(out))  # fmt: skip
    rows = {r["family"]: r["conveyor"] for r in json.loads(out.read_text())["rows"]}
    for family, ours in rows.items():
        assert ours["status"] == "ok", (family, ours)
        assert ours["logits_rel_err_vs_hf"] <= 2e-5 and ours["greedy_equal_hf"], (family, ours)
