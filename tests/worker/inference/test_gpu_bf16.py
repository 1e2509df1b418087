"""On a GPU: bf16 greedy tokens of the pipelined generator, with CUDA-graph decode, equal HF `generate`."""

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_bf16_greedy_matches_hf_on_one_gpu(tmp_path, family):
    from conveyor.inference.families import load_arch
    from conveyor.inference.generate import PipelinePeers, Request, SchedulerHooks, run_generation
    from conveyor.inference.loader import Shard, load_stage
    from conveyor.inference.sampling import SamplingParams
    from conveyor.testing.tiny import save_tiny

    model_dir = save_tiny(family, tmp_path / family)
    device = torch.device("cuda")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    prompts = [[5, 9, 13, 2, 7], [11, 4], [3, 8, 8, 21, 30, 31, 6]]
    new = 12
    expected = []
    for p in prompts:
        out = hf.generate(
            torch.tensor([p], device=device),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        expected.append(out[0, len(p) :].tolist())

    arch = load_arch(str(model_dir))
    stage = load_stage(
        str(model_dir), arch, stages=1, stage=0, shard=Shard(0, 1), dtype=torch.bfloat16, device=device
    )
    stage.setup_cache(4, 64, torch.bfloat16, device)
    got: dict[int, list[int]] = {}
    hooks = SchedulerHooks(on_result=lambda r: got.__setitem__(r.id, r.output_ids))
    from conveyor.topology import Layout, Topology

    peers = PipelinePeers.from_topology(Topology(Layout(), rank=0, world_size=1))
    run_generation(
        stage,
        peers,
        SamplingParams(),
        [Request(i, p, new) for i, p in enumerate(prompts)],
        micro_batches=1,
        lanes_per_micro_batch=3,
        device=device,
        hooks=hooks,
    )
    assert [got[i] for i in range(len(prompts))] == expected
