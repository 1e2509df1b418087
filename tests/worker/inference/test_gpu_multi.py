"""On two GPUs (NCCL): bf16 greedy tokens of 2 stages and of tensor parallel 2 equal HF `generate` in one
process. Skipped without two GPUs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conveyor.testing.tiny import save_tiny

from tests.worker.inference.generation import conveyor_generate, rows_by_prompt

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
    rows = rows_by_prompt(
        conveyor_generate(
            d,
            PROMPTS,
            *("--stages", str(stages), "--tensor-parallel", str(tensor_parallel), "--device", "cuda"),
            *("--dtype", "bfloat16", "--max-new-tokens", str(new)),
            timeout=300,
            NCCL_NVLS_ENABLE="0",
            TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
        )
    )
    tok = T.AutoTokenizer.from_pretrained(d)
    hf = T.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).cuda().eval()
    for p in PROMPTS:
        ids = torch.tensor([tok(p)["input_ids"]], device="cuda")
        want = hf.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
        assert rows[p]["output_ids"] == want.tolist(), p
