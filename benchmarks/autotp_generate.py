"""``init_inference(..., replace_with_kernel_inject=True)`` against the HF model it replaces: the same
``generate`` call, greedy, on one GPU, in the same run.

    python benchmarks/autotp_generate.py --model-shape llama2-7b --batch-sizes 1,16 --new-tokens 128

A Llama-shaped HF model with random weights is built on the GPU (no checkpoint). HF's ``generate`` is
timed first (the injection releases the HF weights), then ``engine.module.generate``: its first call per
batch size includes the warm-up (compile, tune, capture: reported apart), the second is timed. Reported:
tokens/s of each, the ratio, and how many greedy tokens agree (bf16: rounding may part them late).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "worker"), str(ROOT)]

from benchmarks.common import SHAPES, llama_config, save_report  # noqa: E402


def timed(fn):  # type: ignore[no-untyped-def]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-shape", default="llama2-7b", choices=list(SHAPES))
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--out", default="benchmarks/results/autotp_generate.json")
    args = p.parse_args()
    import conveyor
    import transformers

    dtype = getattr(torch, args.dtype)
    config = llama_config(args.model_shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).eval()  # float32: the reference logits first
    batches = [int(b) for b in args.batch_sizes.split(",")]
    prompts = {b: torch.randint(3, config.vocab_size, (b, args.prompt_len), device="cuda") for b in batches}
    kw = {"max_new_tokens": args.new_tokens, "do_sample": False, "min_new_tokens": args.new_tokens}
    rows: list[dict] = []
    hf_tokens, hf_logits = {}, {}
    with torch.inference_mode():
        exact = {b: model(prompts[b]).logits[:, -1] for b in batches}

        def error(logits: torch.Tensor, b: int) -> float:  # relative to the float32 model's last logits
            return ((logits.float() - exact[b]).abs().max() / exact[b].abs().max()).item()

        model.to(dtype)
        for b in batches:
            hf_logits[b] = model(prompts[b]).logits[:, -1].float()
            model.generate(prompts[b][:, :8], max_new_tokens=4, do_sample=False)  # CUDA context, cuBLAS
            hf_tokens[b], seconds = timed(lambda b=b: model.generate(prompts[b], **kw))
            rows.append(
                {
                    "system": "hf",
                    "batch": b,
                    "seconds": seconds,
                    "tokens_per_s": b * args.new_tokens / seconds,
                    "last_logits_error_vs_float32": error(hf_logits[b], b),
                }
            )
            print(rows[-1], file=sys.stderr)
    engine, setup = timed(
        lambda: conveyor.init_inference(
            model,
            tensor_parallel={"tp_size": 1},
            dtype=dtype,
            replace_with_kernel_inject=True,
            max_out_tokens=args.prompt_len + args.new_tokens + 8,
        )
    )
    kw.pop("min_new_tokens")  # no early stop with random weights' end token: lengths equal to HF's
    for b in batches:
        with torch.inference_mode():
            logits = engine.module(prompts[b]).logits[:, -1].float()
        logit_error = ((logits - hf_logits[b]).abs().max() / hf_logits[b].abs().max()).item()
        _, first = timed(lambda b=b: engine.module.generate(prompts[b], **kw))
        tokens, seconds = timed(lambda b=b: engine.module.generate(prompts[b], **kw))
        new = tokens[:, args.prompt_len :]
        ref = hf_tokens[b][:, args.prompt_len :]
        width = min(new.shape[1], ref.shape[1])
        agree = (new[:, :width] == ref[:, :width]).cumprod(1).sum(1).float().mean().item()
        hf = next(r for r in rows if r["system"] == "hf" and r["batch"] == b)
        rows.append(
            {
                "system": "conveyor kernel inject",
                "batch": b,
                "seconds": seconds,
                "first_call_s": first,
                "tokens_per_s": b * new.shape[1] / seconds,
                "vs_hf": hf["seconds"] / seconds,
                "greedy_prefix_agreeing": agree,
                "last_logits_max_error_relative": logit_error,
                "last_logits_error_vs_float32": error(logits, b),
            }
        )
        print(rows[-1], file=sys.stderr)
    report = {
        "device": torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "init_inference_s": setup,
        "rows": rows,
    }
    save_report(report, args.out)


if __name__ == "__main__":
    main()
