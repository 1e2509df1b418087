"""``conveyor.init_inference`` side by side with DeepSpeed's own ``deepspeed.init_inference`` (AutoTP,
``replace_with_kernel_inject=False``) on the same tiny random model of every family issue 24 lists.

    python benchmarks/autotp_deepspeed.py --tp 2,4 --out $OUT/autotp_deepspeed.json

For each family and TP size one group of N rank processes (benchmarks/ranks.py: one GPU per rank with
NCCL, or N ranks sharing one GPU over gloo, or the CPU) builds the family's test model
(tests/worker/autotp/families.py, seeded: every rank and every engine gets the same weights), takes the
single-process HF outputs on the full copy, splits it with one engine, takes its outputs, and rank 0
saves both; then the same for the other engine on a fresh copy. An engine that raises is recorded as
"error: ...", a TP size our planner refuses as "refused: ...", and a rank that crashes or hangs ends only
that group: "crashed: signal 11", "timed out after 300s", and the engines not yet run are retried in a
new group. Without an importable ``deepspeed`` its column says "skipped".

Compared, as tests/worker/autotp compares: logits (causal LM, encoder-decoder with 3 decoder tokens,
the encoders' masked-LM head) as max |engine - HF| over the largest |HF| logit, greedy tokens of
``generate`` (6 new tokens; causal and encoder-decoder) equal to HF's, and the two engines against each
other. A JSON report and a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "worker"), str(ROOT)]

from benchmarks.common import save_report  # noqa: E402
from benchmarks.ranks import Layout, layout, run_group  # noqa: E402

# Issue 24's list, in its order (names as tests/worker/autotp/families.py spells them).
ISSUE_FAMILIES = [
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "phi", "falcon", "gptj", "gpt_neo", "gpt_neox",
    "codegen", "bloom", "mpt", "opt", "gpt2", "t5", "bart", "m2m_100", "marian", "pegasus", "bert",
    "roberta", "xlm_roberta", "electra", "albert", "deberta_v2",
]  # fmt: skip
ENGINES = ("conveyor", "deepspeed")
NEW_TOKENS = 6


# ---- one rank ---------------------------------------------------------------------------------------


def _outputs(model: Any, kind: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits (or the encoder head's outputs) and the greedy tokens, on the CPU."""
    from tests.worker.autotp.families import prompt

    ids = prompt().to(device)  # [2, 7]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        if kind == "seq2seq":
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :3]).logits
            tokens = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1
            )
        elif kind == "causal":
            logits = model(input_ids=ids, attention_mask=mask).logits
            tokens = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                num_beams=1,
                pad_token_id=0,
            )
        else:
            logits, tokens = model(input_ids=ids, attention_mask=mask).logits, None
    return logits.float().cpu(), None if tokens is None else tokens.cpu()


def _split(engine: str, model: Any, tp: int, dtype: torch.dtype, device: torch.device) -> Any:
    if engine == "conveyor":
        import conveyor

        return conveyor.init_inference(
            model,
            tensor_parallel={"tp_size": tp},
            dtype=dtype,
            replace_with_kernel_inject=False,
            device=device,
        )
    import deepspeed

    if os.environ.get("BENCH_DS_TORCH_ALLREDUCE") == "1":
        # DeepSpeed's CPU accelerator all-reduces through its shared-memory kernel, which segfaults on some
        # CPUs; without it DeepSpeed takes torch.distributed's all_reduce. No effect on a GPU (no such op).
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # type: ignore[attr-defined]
    return deepspeed.init_inference(
        model, tensor_parallel={"tp_size": tp}, dtype=dtype, replace_with_kernel_inject=False
    )


def run_engine(engine: str, family: str, tp: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """HF's outputs on the full model, then ``engine``'s on the split one (this rank's view)."""
    from tests.worker.autotp.families import build

    model, kind = build(family)
    model.to(device=device, dtype=dtype)
    full = sum(p.numel() for p in model.parameters())
    ref_logits, ref_tokens = _outputs(model, kind, device)
    t0 = time.perf_counter()
    try:
        split = _split(engine, model, tp, dtype, device)
    except Exception as err:
        from conveyor.autotp import AutoTPError

        why = "refused" if isinstance(err, AutoTPError) else "error"
        return {
            "status": f"{why}: {type(err).__name__}: {str(err)[:400]}",
            "trace": traceback.format_exc()[-2000:],
        }
    setup = time.perf_counter() - t0
    logits, tokens = _outputs(split.module, kind, device)
    return {
        "status": "ok",
        "kind": kind,
        "init_inference_s": setup,
        "param_fraction": sum(p.numel() for p in split.module.parameters()) / full,  # this rank's share
        "ref_logits": ref_logits,
        "ref_tokens": ref_tokens,
        "logits": logits,
        "tokens": tokens,
    }


def rank_main(args: argparse.Namespace) -> None:
    """One rank: each engine of ``--engines`` in turn; rank 0 saves each result as soon as it has it, so
    a later engine's crash does not lose an earlier one's."""
    import conveyor
    import torch.distributed as dist

    torch.set_num_threads(1)
    info = conveyor.init_distributed(backend=args.backend, device=args.device)
    dtype = getattr(torch, args.dtype)
    out = Path(args.rank_out)
    for engine in args.engines.split(","):
        try:
            row = run_engine(engine, args.families, args.tp[0], dtype, info.device)
        except Exception as err:  # an engine that fails after splitting (forward, generate)
            row = {
                "status": f"error: {type(err).__name__}: {str(err)[:400]}",
                "trace": traceback.format_exc()[-2000:],
            }
        if info.rank == 0:
            torch.save(row, out / f"{engine}.pt")
        if info.device.type == "cuda":
            torch.cuda.empty_cache()
        dist.barrier()  # the next engine starts together on every rank


# ---- the driver -------------------------------------------------------------------------------------


def deepspeed_available() -> str | None:
    """None when ``import deepspeed`` will work in the ranks, else why not."""
    if importlib.util.find_spec("deepspeed") is None:
        return "skipped: deepspeed not importable"
    return None


def run_family(
    family: str, tp: int, engines: list[str], lay: Layout, args: argparse.Namespace
) -> dict[str, Any]:
    """Every engine of ``engines`` on ``family`` at ``tp``, a fresh group after a crash for those left."""
    work = Path(args.work) / f"{family}-tp{tp}"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    left = list(engines)
    attempt = 0
    while left:
        for engine in left:
            (work / f"{engine}.pt").unlink(missing_ok=True)
        argv = [
            str(Path(__file__).resolve()),
            "--rank-out", str(work), "--families", family, "--tp", str(tp), "--engines", ",".join(left),
            "--dtype", args.dtype, "--backend", lay.backend, "--device", lay.device,
        ]  # fmt: skip
        env = {"BENCH_DS_TORCH_ALLREDUCE": "1"} if args.deepspeed_torch_allreduce else {}
        group = run_group(
            argv, lay, work, f"attempt{attempt}", args.timeout, env={**env, "PYTHONFAULTHANDLER": "1"}
        )
        attempt += 1
        failure = group.failure(args.timeout)
        done = [e for e in left if (work / f"{e}.pt").exists()]
        for engine in done:
            results[engine] = torch.load(work / f"{engine}.pt", weights_only=False)
        left = left[len(done) :]
        if left:  # the first engine without a result is the one the group ended in
            results[left.pop(0)] = {"status": failure or "no result written (ranks exited 0)"}
    return compare(family, tp, results, args.dtype)


def _rel(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("nan")
    return float((a - b).abs().max() / scale.abs().max().clamp_min(1e-12))


def compare(family: str, tp: int, results: dict[str, dict[str, Any]], dtype: str) -> dict[str, Any]:
    """The JSON row: each engine's status and errors against HF, and the engines against each other."""
    row: dict[str, Any] = {"family": family, "tp": tp}
    ok = {e: r for e, r in results.items() if r.get("status") == "ok"}
    for engine, r in results.items():
        cell: dict[str, Any] = {"status": r["status"]}
        if "trace" in r:
            cell["trace"] = r["trace"]
        if engine in ok:
            cell.update(
                kind=r["kind"],
                init_inference_s=round(r["init_inference_s"], 3),
                param_fraction=round(r["param_fraction"], 4),
                logits_rel_err_vs_hf=_rel(r["logits"], r["ref_logits"], r["ref_logits"]),
                greedy_equal_hf=None
                if r["tokens"] is None
                else bool(torch.equal(r["tokens"], r["ref_tokens"])),
            )
        row[engine] = cell
    if len(ok) == 2:
        a, b = ok["conveyor"], ok["deepspeed"]
        row["engines"] = {
            # both took HF's outputs from the same seeded model: they must agree for the comparison to hold
            "same_hf_reference": bool(torch.equal(a["ref_logits"], b["ref_logits"])),
            "logits_rel_diff": _rel(a["logits"], b["logits"], a["ref_logits"]),
            "greedy_equal": None if a["tokens"] is None else bool(torch.equal(a["tokens"], b["tokens"])),
        }
    return row


def _cell(c: dict[str, Any] | None, tol: float) -> tuple[str, str, str, str]:
    if c is None:
        return "-", "", "", ""
    if c["status"] != "ok":
        return c["status"].split("\n")[0][:70].replace("|", "/"), "", "", ""
    err = c["logits_rel_err_vs_hf"]
    mark = "ok" if err <= tol else "MISMATCH"
    greedy = "" if c["greedy_equal_hf"] is None else ("yes" if c["greedy_equal_hf"] else "NO")
    return mark, f"{err:.1e}", greedy, f"{c['param_fraction']:.0%}"


def markdown(rows: list[dict[str, Any]], tol: float) -> str:
    lines = [
        "| family | TP | conveyor | err vs HF | greedy = HF | params per rank | DeepSpeed | err vs HF | greedy = HF "
        "| params per rank | conveyor vs DS | same greedy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        c = _cell(r.get("conveyor"), tol)
        d = _cell(r.get("deepspeed"), tol)
        e = r.get("engines")
        both = ("", "") if e is None else (
            f"{e['logits_rel_diff']:.1e}", "" if e["greedy_equal"] is None else ("yes" if e["greedy_equal"] else "NO")
        )  # fmt: skip
        lines.append(
            f"| {r['family']} | {r['tp']} | {' | '.join(c)} | {' | '.join(d)} | {' | '.join(both)} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(ISSUE_FAMILIES), help="comma list (families.py names)")
    p.add_argument("--tp", type=lambda s: [int(t) for t in s.split(",")], default=[2, 4])
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--timeout", type=float, default=300, help="seconds for one family's group of ranks")
    p.add_argument("--jobs", type=int, default=0, help="groups run at once (default: cores / TP, at least 1)")
    p.add_argument(
        "--deepspeed-torch-allreduce",
        action="store_true",
        help="CPU only: DeepSpeed all-reduces with torch.distributed, not its shared-memory kernel (segfaults here)",
    )
    p.add_argument("--work", default="", help="scratch folder for the ranks' results and logs")
    p.add_argument("--out", default="benchmarks/results/autotp_deepspeed.json")
    p.add_argument("--rank-out", default="", help=argparse.SUPPRESS)  # set for a rank process
    p.add_argument("--backend", default="gloo", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_out:
        rank_main(args)
        return
    import tempfile

    from tests.worker.autotp.families import FAMILIES

    families = args.families.split(",")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"--families: unknown {unknown}; known: {sorted(FAMILIES)}")
    engines = [e for e in args.engines.split(",") if e]
    if set(engines) - set(ENGINES) or not engines:
        raise SystemExit(f"--engines: comma list of {ENGINES}, got {args.engines!r}")
    skipped = deepspeed_available() if "deepspeed" in engines else None
    if skipped:
        engines.remove("deepspeed")
    args.work = args.work or tempfile.mkdtemp(prefix="autotp_ds_")
    tol = 2e-5 if args.dtype == "float32" else 2e-2
    rows: list[dict[str, Any]] = []
    layouts: dict[int, str] = {}
    on_gpu = False
    t0 = time.perf_counter()
    for tp in args.tp:
        lay = layout(tp, args.device)
        jobs = args.jobs or max(1, (os.cpu_count() or 4) // tp)  # the ranks mostly wait on each other
        layouts[tp] = lay.note
        on_gpu |= lay.device == "cuda"
        print(f"TP {tp}: {lay.note}; {len(families)} families, {jobs} at a time", file=sys.stderr, flush=True)
        with ThreadPoolExecutor(jobs) as pool:
            for row in pool.map(lambda f, tp=tp, lay=lay: run_family(f, tp, engines, lay, args), families):
                if skipped:
                    row["deepspeed"] = {"status": skipped}
                rows.append(row)
                print(json.dumps(row, default=str)[:400], file=sys.stderr, flush=True)
    table = markdown(rows, tol)
    report = {
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "layout": layouts,
        "dtype": args.dtype,
        "deepspeed_torch_allreduce": args.deepspeed_torch_allreduce,
        "tolerance": f"ok: max |logits - HF| <= {tol} x max |HF logits|",
        "deepspeed_version": _version("deepspeed"),
        "transformers_version": _version("transformers"),
        "torch_version": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
        "table": table,
    }
    save_report(report, args.out)
    print("\n".join(f"TP {tp}: {note}" for tp, note in layouts.items()))
    print(f"({args.dtype}; ok: max |logits - HF| <= {tol} of the largest HF logit)\n")
    print(table)


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
