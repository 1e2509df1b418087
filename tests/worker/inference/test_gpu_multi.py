"""On two GPUs (NCCL): bf16 greedy tokens of 2 stages and of tensor parallel 2 equal HF `generate` in one
process. Skipped without two GPUs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conveyor.testing.tiny import save_tiny

from tests.conftest import conveyor_cmd, subprocess_env

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]
PROMPTS = ["hello world", "the quick brown fox jumps over", "a"]


@pytest.mark.parametrize("stages,tensor_parallel", [(2, 1), (1, 2)])
def test_bf16_greedy_matches_hf_on_two_gpus(tmp_path: Path, stages: int, tensor_parallel: int) -> None:
    import transformers as T

    d = save_tiny("llama", tmp_path / "m")
    new = 10
    proc = subprocess.run(
        conveyor_cmd(
            "generate",
            "--model",
            str(d),
            "--stages",
            str(stages),
            "--tensor-parallel",
            str(tensor_parallel),
            "--device",
            "cuda",
            "--dtype",
            "bfloat16",
            "--max-new-tokens",
            str(new),
            *[a for p in PROMPTS for a in ("--prompt", p)],
        ),
        env=subprocess_env(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["prompt"]: r for r in map(json.loads, proc.stdout.splitlines())}
    tok = T.AutoTokenizer.from_pretrained(d)
    hf = T.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).cuda().eval()
    for p in PROMPTS:
        ids = torch.tensor([tok(p)["input_ids"]], device="cuda")
        want = hf.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
        assert rows[p]["output_ids"] == want.tolist(), p
