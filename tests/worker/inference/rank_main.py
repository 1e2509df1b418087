"""One rank of a multi-process generation test: ``python -m tests.worker.inference.rank_main CASE.json``.

CASE: {"stages", "tensor_parallel", "models": {family: dir}, "prompts": [[ids]], "max_new_tokens",
"samplings": {name: SamplingParams fields}, "micro_batches", "lanes", "prefill_chunk" (optional),
"out": path}. Stage 0 / tp 0
writes {family: {sampling name: [output ids per prompt]}} to ``out``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from conveyor.distributed import destroy_distributed, init_distributed
from conveyor.inference.kernels.cuda_graphs import EAGER
from conveyor.inference.pipeline.generate import Request
from conveyor.inference.pipeline.sampling import SamplingParams
from conveyor.inference.rank_builder import build_generation_rank
from conveyor.topology import Layout, Topology

from tests.worker.inference.generation import output_ids


def main(path: str) -> None:
    case = json.loads(Path(path).read_text())
    info = init_distributed(device="cpu")
    topo = Topology(Layout(1, case["stages"], case["tensor_parallel"]))
    results: dict[str, dict[str, list[list[int]]]] = {}
    for family, model_dir in case["models"].items():
        rank = build_generation_rank(
            model_dir,
            topo,
            dtype=torch.float32,
            device=info.device,
            micro_batches=case["micro_batches"],
            lanes_per_micro_batch=case["lanes"] // case["micro_batches"],
            max_len=48,
            options=EAGER,
        )
        model, peers = rank.model, rank.peers
        for name, fields in case["samplings"].items():
            params = SamplingParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
            requests = [Request(i, p, case["max_new_tokens"]) for i, p in enumerate(case["prompts"])]
            got = output_ids(
                model,
                peers,
                params,
                requests,
                micro_batches=case["micro_batches"],
                lanes_per_micro_batch=case["lanes"] // case["micro_batches"],
                device=info.device,
                prefill_chunk=case.get("prefill_chunk", 2048),
            )
            if peers.is_first:
                results.setdefault(family, {})[name] = [got[i] for i in range(len(case["prompts"]))]
    if topo.stage == 0 and topo.tp_rank == 0:
        with open(case["out"], "w") as f:
            json.dump(results, f)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
    # as conveyor.rank does: the interpreter's teardown of a gloo group can abort a finished rank
    # ("terminate called without an active exception", seen 1 run in 10)
    from conveyor.rank import exit_now

    exit_now(0)
