"""An estimate, not a measurement: what gathering free lanes before prompts join (generate.Admission)
buys a batch job whose sequences end at different steps, as sequences ending at their EOS do.

The job of ``gpu_session.sh stagger`` (1,024 prompts of 32-255 tokens, each with its own
max_new_tokens in 16-240, batch 256) runs through the real scheduler on the CPU with a tiny model, once
per policy, counting its decode steps and its prompt passes (and their padded tokens). The H200 time
is then estimated from ``benchmarks/batch_step.py``'s figures (docs/performance.md, Llama-2-7B shape,
bf16): a decode step of 256 lanes 13 ms, an eager prompt pass max(33.1 ms, 232.6 ms per 8,000 padded
tokens), one prompt of 160 tokens being launch-bound. ``bash benchmarks/gpu_session.sh stagger``
measures the job itself.

    python3 benchmarks/admission_model.py      # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "worker"), str(ROOT)]

import torch  # noqa: E402

from benchmarks.common import save_report  # noqa: E402

DECODE_STEP_S = 0.013  # 256 lanes, position ~200 (batch_step.py, H200)
PROMPT_PASS_MIN_S = 0.0331  # one prompt of 160 tokens, eager: launch-bound
PROMPT_PASS_S_PER_TOKEN = 0.2326 / 8000  # 50 prompts of 160 tokens, eager


def count(model_dir: str, requests: list[Any], admission: Any, lanes: int) -> dict[str, Any]:
    from conveyor.inference.pipeline.generate import Scheduler, SchedulerHooks, run_generation
    from conveyor.inference.pipeline.sampling import SamplingParams
    from conveyor.testing.reference import one_process_rank

    passes: list[int] = []  # padded tokens of each prompt pass
    steps = [0]
    prefill, decode = Scheduler._prefill, Scheduler._decode

    def counted_prefill(self: Scheduler, joining: list[Any]) -> Any:
        passes.append(len(joining) * max(2, *(len(r.prompt_ids) for _, r in joining)))
        return prefill(self, joining)

    def counted_decode(self: Scheduler, mb: int) -> Any:
        item = decode(self, mb)
        steps[0] += item is not None
        return item

    Scheduler._prefill, Scheduler._decode = counted_prefill, counted_decode  # type: ignore[method-assign]
    try:
        model, peers = one_process_rank(model_dir, lanes=lanes, max_len=500)
        tokens = [0]
        run_generation(
            model,
            peers,
            SamplingParams(),
            requests,
            micro_batches=1,
            lanes_per_micro_batch=lanes,
            device=torch.device("cpu"),
            admission=admission,
            hooks=SchedulerHooks(on_result=lambda r: tokens.__setitem__(0, tokens[0] + len(r.output_ids))),
        )
    finally:
        Scheduler._prefill, Scheduler._decode = prefill, decode  # type: ignore[method-assign]
    seconds = steps[0] * DECODE_STEP_S + sum(
        max(PROMPT_PASS_MIN_S, PROMPT_PASS_S_PER_TOKEN * t) for t in passes
    )
    return {
        "decode_steps": steps[0],
        "prompt_passes": len(passes),
        "padded_prompt_tokens": sum(passes),
        "output_tokens": tokens[0],
        "h200_estimate_s": seconds,
        "h200_estimate_tokens_per_s": tokens[0] / seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=1024)
    p.add_argument("--lanes", type=int, default=256)
    p.add_argument("--out", default="benchmarks/results/admission_model.json")
    args = p.parse_args()
    from conveyor.inference.pipeline.generate import BATCH, IMMEDIATE, Request
    from conveyor.testing.tiny import save_tiny

    torch.set_num_threads(1)
    model_dir = save_tiny("llama", tempfile.mkdtemp(), tokenizer=False)
    rng = random.Random(0)
    requests = [
        Request(i, [rng.randrange(3, 300) for _ in range(rng.randint(32, 255))], rng.randint(16, 240))
        for i in range(args.prompts)
    ]
    requests.sort(key=lambda r: len(r.prompt_ids), reverse=True)  # as the job orders them
    report = {"prompts": args.prompts, "lanes": args.lanes, "policies": {}}
    for name, admission in (("immediate", IMMEDIATE), ("batch", BATCH)):
        row = count(str(model_dir), requests, admission, args.lanes)
        report["policies"][name] = row
        print(name, row, file=sys.stderr, flush=True)
    save_report(report, args.out)


if __name__ == "__main__":
    main()
