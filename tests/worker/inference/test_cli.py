"""``conveyor generate``: text in, the same tokens as HF generate out, with the ranks it starts itself."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conveyor.testing.tiny import save_tiny

from tests.conftest import conveyor_cmd, subprocess_env
from tests.worker.inference.generation import conveyor_generate, rows_by_prompt


@pytest.mark.integration
def test_generate_two_stages_matches_hf(tmp_path: Path) -> None:
    import transformers as T

    d = save_tiny("qwen2", tmp_path / "m")
    prompts = ["hello world", "the quick brown fox jumps over", "a"]  # 3 on 2 stages: a lane unused
    proc = conveyor_generate(d, prompts, "--stages", "2", "--max-new-tokens", "6", OMP_NUM_THREADS="1")
    rows = rows_by_prompt(proc)
    assert "tokens/s" in proc.stderr
    tok = T.AutoTokenizer.from_pretrained(d)
    hf = T.AutoModelForCausalLM.from_pretrained(d).eval()
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"]])
        want = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1] :].tolist()
        assert rows[p]["output_ids"] == want
        assert rows[p]["text"] == tok.decode(want, skip_special_tokens=True)


def test_generate_refuses_an_unsupported_family(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    proc = conveyor_generate(tmp_path, ["hi"], timeout=120)
    assert proc.returncode != 0
    assert "model family 't5'" in proc.stderr and "supported families: llama" in proc.stderr


def _ranks_of(pid: int) -> list[int]:
    """The live processes started by the supervisor of process ``pid`` (their environment names it)."""
    mine = f"CONVEYOR_PARENT_PID={pid}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mine in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours
                continue
    return found


@pytest.mark.integration
def test_a_failing_rank_is_named_and_its_code_returned(tmp_path: Path) -> None:
    """The supervisor of ``conveyor run``: the first rank that fails stops the others, and the command
    exits with its code, naming it (here every rank fails to read its process group's timeout: a
    failure the command's pre-flight cannot see, as a damaged model directory it refuses itself)."""
    d = save_tiny("llama", tmp_path / "m")
    proc = conveyor_generate(
        d,
        ["hi"],
        "--stages",
        "2",
        "--grace-seconds",
        "2",
        OMP_NUM_THREADS="1",
        CONVEYOR_DIST_TIMEOUT="not-a-number",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert re.search(r"conveyor generate: rank [01] exited with code 1", proc.stderr), proc.stderr[-3000:]
    assert proc.stdout == ""


@pytest.mark.integration
def test_sigterm_stops_every_rank(tmp_path: Path) -> None:
    """SIGTERM to ``conveyor generate`` reaches its ranks (each in its own session, so only the forwarded
    signal stops them): it exits 128 + 15 and leaves no rank behind."""
    d = save_tiny("llama", tmp_path / "m")
    cmd = conveyor_cmd(
        "generate", "--model", str(d), "--stages", "2", "--max-new-tokens", "200", "--prompt", "hi"
    )
    proc = subprocess.Popen(
        cmd,
        env=subprocess_env(OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(_ranks_of(proc.pid)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_ranks_of(proc.pid)) == 2, "the ranks never started"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert _ranks_of(proc.pid) == []
