"""gpt-fast (pytorch-labs) decode, timed the way benchmarks/generate.py times ours: the peer in the same run.

    python benchmarks/gpt_fast.py --gpt-fast PATH --batch 16

PATH is a checkout of https://github.com/pytorch-labs/gpt-fast (fetched for the run, never committed;
measured at commit 32971d3). Its Llama-2-7B shape ("7B") with random bf16 weights, run as its
generate.py runs it: its inductor options, ``decode_one_token`` compiled with
``mode="reduce-overhead", fullgraph=True``, the prompt eager; the same prompt in every row (its batch
mode). Its sampling at temperature 0 is greedy. Its ``generate`` cannot stop after the first token, so
ms/token = (generate of N new tokens - generate of 2) / (N - 2), best of three after two warm-ups.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt-fast", required=True, help="a gpt-fast checkout")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    sys.path.insert(0, str(Path(args.gpt_fast).resolve()))
    # its tokenizer module imports these at the top; no tokenizer is used here
    for name in ("sentencepiece", "tiktoken", "tiktoken.load"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["tiktoken.load"].load_tiktoken_bpe = None  # type: ignore[attr-defined]
    import generate as gpt_fast  # sets gpt-fast's inductor options
    from model import Transformer

    with torch.device("meta"):
        model = Transformer.from_name("7B")
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    model.eval()
    gpt_fast.decode_one_token = torch.compile(
        gpt_fast.decode_one_token, mode="reduce-overhead", fullgraph=True
    )
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt_len,), device="cuda", dtype=torch.int)

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gpt_fast.generate(model, prompt, n, args.batch, interactive=False, draft_model=None, temperature=0.0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    n = args.new_tokens
    run(n)
    run(n)
    step = min((run(n) - run(2)) / (n - 2) for _ in range(3))
    print(json.dumps({"ms_per_token": step * 1e3, "tokens_per_s": args.batch / step}))


if __name__ == "__main__":
    main()
