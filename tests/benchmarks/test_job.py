"""benchmarks/job.py on the CPU (tiny Llama, float32): the whole comparison runs as on the GPU, so a device
call never finds a bug in the benchmark itself. Cold and warm runs of ``conveyor run``, HF as a job of its
own (hf_job.py) and in this process; both sides generate the same greedy tokens for every prompt (each
with its own max_new_tokens), with lanes gathered before prompts join and with prompts joining at once,
and nothing compiles or captures after warm-up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, subprocess_env


@pytest.mark.integration
def test_smoke_run_compares_whole_jobs_that_generate_the_same_tokens(tmp_path: Path) -> None:
    out, work = tmp_path / "job.json", tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "job.py"), "--device", "cpu", "--model-shape", "tiny"]
        + ["--dtype", "float32", "--prompts", "6", "--prompt-lens", "4,20", "--new-tokens", "4"]
        + ["--new-tokens-spread", "2,5", "--runs", "cold,warm:CONVEYOR_ADMISSION=immediate"]
        + ["--batch-size", "4", "--workdir", str(work), "--out", str(out)],
        env=subprocess_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["run"] for r in report["runs"]] == ["cold", "warm:CONVEYOR_ADMISSION=immediate"]
    assert report["page_cache"] == "warm" and report["page_cache_imports_s"] > 0  # read before any run
    rows = [json.loads(line) for line in (work / "job" / "input.jsonl").open()]
    limits = [r["max_new_tokens"] for r in rows]
    assert len(set(limits)) > 1 and all(2 <= n <= 5 for n in limits)
    for row in report["runs"]:
        assert row["prompts"] == 6 and row["output_tokens"] == sum(limits), row
        assert row["late_compiles_or_captures"] == 0, row
        assert 0 < row["start_to_first_decode_s"] < row["wall_s"], row
        assert row["decode_tokens_per_s"] > 0, row
        for hf in ("hf_job_cold", "hf_job_warm", "hf_cold", "hf_warm"):
            assert row[f"speedup_vs_{hf}"] > 0, row
    assert len(report["hf_job"]) == 2 and all(r["output_tokens"] == sum(limits) for r in report["hf_job"])
    assert report["runs"][0]["speedup_vs_hf_job_cold"] == pytest.approx(
        report["hf_job"][0]["wall_s"] / report["runs"][0]["wall_s"]
    )
    results = work / "job" / "out"
    ours = {r["id"]: r["output_ids"] for r in map(json.loads, (results / "results.jsonl").open())}
    theirs = {r["id"]: r["output_ids"] for r in map(json.loads, (results / "hf-results.jsonl").open())}
    assert ours == theirs and len(ours) == 6
