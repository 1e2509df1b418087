"""benchmarks/admission_model.py runs (a small job): both policies give every prompt its tokens, and
gathering free lanes makes fewer prompt passes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, subprocess_env


def test_the_admission_model_counts_fewer_passes_when_lanes_gather(tmp_path: Path) -> None:
    out = tmp_path / "model.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "admission_model.py")]
        + ["--prompts", "96", "--lanes", "32", "--out", str(out)],
        env=subprocess_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["policies"]
    assert rows["immediate"]["output_tokens"] == rows["batch"]["output_tokens"] > 96
    assert rows["batch"]["prompt_passes"] < rows["immediate"]["prompt_passes"]
    assert rows["batch"]["h200_estimate_s"] > 0
