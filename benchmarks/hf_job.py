"""The same batch job as a user writes it with HF transformers alone: a fresh process that reads the
prompts (``input_ids`` JSON lines), loads the model, runs ``generate`` greedily over left-padded batches
in input order and writes one JSON line per prompt. ``benchmarks/job.py`` times it end to end, as it
times ``conveyor run``, so that both sides pay their process start, imports and load. A row's own
``max_new_tokens`` is kept as a HF user would keep it: ``generate`` has one limit per call, so a batch
generates to its rows' largest and each row's output is cut to its own.

    python3 benchmarks/hf_job.py MODEL INPUT OUTPUT --new-tokens 128 --batch-size 64

The last line printed is a JSON object of its phases (import, load, generate, in seconds).
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402


def generate_padded(model: Any, prompts: list[list[int]], new: int, device: str) -> torch.Tensor:
    """HF ``generate``, greedy, over ``prompts`` left-padded to the longest: the new tokens [k, new]."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=model.config.eos_token_id,
        )
    return out[:, width:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    imported = time.perf_counter()
    rows = [json.loads(line) for line in Path(args.input).read_text().splitlines() if line.strip()]
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model = model.to(args.device).eval()
    loaded = time.perf_counter()
    tokens = 0
    with open(args.output + ".tmp", "w") as out:
        for i in range(0, len(rows), args.batch_size):
            part = rows[i : i + args.batch_size]
            limits = [r.get("max_new_tokens", args.new_tokens) for r in part]
            generated = generate_padded(model, [r["input_ids"] for r in part], max(limits), args.device)
            for row, limit, new in zip(part, limits, generated.tolist(), strict=True):
                new = new[:limit]
                tokens += len(new)  # rows that stopped early are padded: an upper bound
                out.write(json.dumps({"id": row.get("id"), "output_ids": new}) + "\n")
    os.replace(args.output + ".tmp", args.output)
    done = time.perf_counter()
    phases = {"import_s": imported - T0, "load_s": loaded - imported, "generate_s": done - loaded}
    print(json.dumps({**phases, "output_tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
