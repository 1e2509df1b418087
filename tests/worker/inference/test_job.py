"""The batch inference job: results as JSONL, a restart after a killed rank repeats nothing and drops
nothing, a restart after completion exits at once, and R > 1 replicas merge into one output."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conveyor.env import PodEnv, pod_environ
from conveyor.spec import parse_spec
from conveyor.testing.tiny import save_tiny
from conveyor.utils import free_port

from tests.conftest import subprocess_env
from tests.worker.inference.launch import wait_ranks

pytestmark = pytest.mark.integration


def make_spec(
    tmp: Path,
    model: Path,
    stages: int,
    tp: int,
    replicas: int = 1,
    prompts: int = 12,
    new: int = 6,
    kv_cache_dtype: str = "auto",
):
    lines = []
    for i in range(prompts):
        row: dict = (
            {"id": f"p{i}", "prompt": f"the quick brown fox {i}"}
            if i % 2
            else {"id": i, "input_ids": [5 + i, 9, 11]}
        )
        if i % 4 == 3:  # a prompt's own limit, below the spec's: sequences end at different steps
            row["max_new_tokens"] = 1 + i % 3
        lines.append(json.dumps(row))
    (tmp / "in.jsonl").write_text("\n".join(lines) + "\n")
    return parse_spec(
        {
            "mode": "inference",
            "device": "cpu",
            "model": {"path": str(model), "dtype": "float32", "kvCacheDtype": kv_cache_dtype},
            "parallelism": {"stages": stages, "tensorParallel": tp, "replicas": replicas},
            "checkpoint": {"path": str(tmp / "ckpt"), "every": 1},
            "inference": {
                "input": str(tmp / "in.jsonl"),
                "output": str(tmp / "out.jsonl"),
                "maxNewTokens": new,
                "batchSize": 2,
                "sampling": {"temperature": 0.7, "seed": 3},
            },
        }
    )


def start_replica(spec, replica: int, tmp: Path, **extra_env: str) -> list[subprocess.Popen]:
    port, procs = free_port(), []
    p = spec.parallelism
    for stage in range(p.stages):
        env = pod_environ(
            job="t", spec=spec, replica=replica, stage=stage, master_addr="127.0.0.1", master_port=port
        )
        pod = PodEnv.from_environ(env)
        for local in range(p.tensor_parallel):
            full = subprocess_env(
                **{**env, **pod.rank_environ(local)},
                OMP_NUM_THREADS="1",
                CONVEYOR_TERMINATION_LOG=str(tmp / f"term-r{replica}-s{stage}-t{local}"),
                **extra_env,
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.worker.inference.job_main", str(local)],
                    env=full,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


def output_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("m") / "llama")


def test_kill_a_rank_then_restart_completes_each_prompt_once(model: Path, tmp_path: Path) -> None:
    spec = make_spec(tmp_path, model, stages=2, tp=1, prompts=30, new=10)
    out = tmp_path / "out.jsonl"
    procs = start_replica(spec, 0, tmp_path)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 5):
        assert all(p.poll() is None for p in procs), "job ended before it could be killed"
        time.sleep(0.05)
    procs[1].kill()  # the last stage dies mid-run; the group fails as a whole (as the operator sees it)
    time.sleep(0.5)
    for p in procs:
        p.kill()
        p.wait()
    partial = output_rows(out) if out.exists() else []
    record = json.loads((tmp_path / "out.jsonl.progress.json").read_text())
    assert 0 < record["completed"] < 30 and not record["done"], record

    wait_ranks(start_replica(spec, 0, tmp_path))
    rows = output_rows(out)
    ids = [json.dumps(r["id"]) for r in rows]
    assert len(ids) == len(set(ids)) == 30
    assert set(ids) == {json.dumps(i if i % 2 == 0 else f"p{i}") for i in range(30)}
    assert {json.dumps(r["id"]) for r in partial} <= set(ids)
    for r in rows:
        assert 1 <= len(r["output_ids"]) <= 10 and r["finish_reason"] in ("stop", "length")
        assert isinstance(r["text"], str)
    assert json.loads((tmp_path / "term-r0-s0-t0").read_text())["completed"] is True

    # A restart after completion exits 0 at once and writes nothing.
    before = out.read_bytes()
    wait_ranks(start_replica(spec, 0, tmp_path), timeout=120)
    assert out.read_bytes() == before


def test_two_replicas_merge_into_one_output_equal_to_one_process(model: Path, tmp_path: Path) -> None:
    """2 replicas, seeded sampling: one merged output, the tokens of one process."""
    from conveyor.inference.job import load_tokenizer, read_requests, sampling_params
    from conveyor.inference.model.families import load_arch
    from conveyor.testing.reference import one_process_rank

    from tests.worker.inference.generation import output_ids

    spec = make_spec(tmp_path, model, stages=1, tp=1, replicas=2)
    wait_ranks([p for r in range(2) for p in start_replica(spec, r, tmp_path)])
    got = {json.dumps(r["id"]): r["output_ids"] for r in output_rows(tmp_path / "out.jsonl")}
    assert len(got) == 12
    for i in range(3, 12, 4):  # the rows' own max_new_tokens
        assert 1 <= len(got[json.dumps(f"p{i}")]) <= 1 + i % 3

    tokenizer = load_tokenizer(str(model))
    requests = read_requests(
        spec.inference.input, 0, 1, tokenizer, spec.inference.max_new_tokens, load_arch(model)
    )
    m, peers = one_process_rank(model, lanes=3, max_len=40)
    want = output_ids(
        m, peers, sampling_params(spec, (2,)), requests, lanes_per_micro_batch=3, key=json.dumps
    )
    assert got == want


def test_a_float8_kv_cache_job_gives_the_tokens_of_one_float8_process(model: Path, tmp_path: Path) -> None:
    """``spec.model.kvCacheDtype: fp8`` reaches every rank: 2 stages x 2 tensor ranks give the tokens of
    one process with a float8 cache, which are not the float32 cache's."""
    from conveyor.inference.job import load_tokenizer, read_requests, sampling_params
    from conveyor.inference.model.families import load_arch
    from conveyor.testing.reference import one_process_rank

    from tests.worker.inference.generation import output_ids

    spec = make_spec(tmp_path, model, stages=2, tp=2, new=12, kv_cache_dtype="fp8")
    wait_ranks(start_replica(spec, 0, tmp_path))
    got = {json.dumps(r["id"]): r["output_ids"] for r in output_rows(tmp_path / "out.jsonl")}
    assert len(got) == 12

    requests = read_requests(
        spec.inference.input,
        0,
        1,
        load_tokenizer(str(model)),
        spec.inference.max_new_tokens,
        load_arch(model),
    )
    want = {}
    for kv in ("fp8", "auto"):
        m, peers = one_process_rank(model, lanes=3, max_len=40, kv_cache_dtype=kv)
        want[kv] = output_ids(
            m, peers, sampling_params(spec, (2,)), requests, lanes_per_micro_batch=3, key=json.dumps
        )
    assert got == want["fp8"]
    assert want["fp8"] != want["auto"]


def test_a_profiled_job_writes_each_ranks_summary(model: Path, tmp_path: Path) -> None:
    """CONVEYOR_PROFILE_DIR: each rank of a 2-stage job writes where its generation's time went."""
    spec = make_spec(tmp_path, model, stages=2, tp=1, prompts=6, new=4)
    wait_ranks(start_replica(spec, 0, tmp_path, CONVEYOR_PROFILE_DIR=str(tmp_path / "profile")))
    assert len(output_rows(tmp_path / "out.jsonl")) == 6
    for stage in (0, 1):
        summary = json.loads((tmp_path / "profile" / f"t-r0-s{stage}-rank{stage}.json").read_text())
        assert summary["wall_seconds"] > 0 and summary["device_busy_seconds"] is None  # (no GPU here)
        names = [row["name"] for row in summary["by_total_time"]]
        assert "aten::linear" in names or "aten::addmm" in names, names
