"""``conveyor``: one command line for the local launcher, the pod worker, the CRD generator and the
operator. Each subcommand imports its implementation lazily, so ``conveyor crd`` and ``conveyor
operator`` never load torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

# subcommand -> "module:function"; each function takes the parsed argparse.Namespace, returns an exit code.
_COMMANDS: dict[str, str] = {
    "run": "conveyor.launcher:main",
    "worker": "conveyor.worker:main",
    "generate": "conveyor.inference.cli:generate_main",
    "crd": "conveyor.crd:main",
    "operator": "conveyor_operator.main:main",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a PipelineJob on this machine, one process per rank (no cluster)")
    run.add_argument("job", nargs="?", help="PipelineJob YAML; omitted: a built-in tiny inference job")
    run.add_argument("--workdir", default=None, help="where the built-in job writes its model and outputs")
    run.add_argument("--restart", type=int, default=0, help="CONVEYOR_RESTART for this launch (resume)")
    run.add_argument("--grace-seconds", type=float, default=10.0, help="SIGTERM -> SIGKILL delay on failure")

    sub.add_parser("worker", help="the pod entry point: reads CONVEYOR_* and starts the pod's ranks")

    gen = sub.add_parser("generate", help="answer one prompt with a HF model split over processes")
    gen.add_argument("--model", required=True, help="HF checkpoint directory")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    gen.add_argument("--stages", type=int, default=1)
    gen.add_argument("--tensor-parallel", type=int, default=1)
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    gen.add_argument(
        "--quantize", default="none", choices=["none", "int8"], help="int8: weight-only int8 block linears"
    )
    gen.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8"],
        help="fp8: a float8 KV cache (half the memory and attention reads; GPUs of compute capability 8.9+)",
    )
    gen.add_argument("--grace-seconds", type=float, default=10.0, help="SIGTERM -> SIGKILL delay on failure")

    crd = sub.add_parser("crd", help="print (or --write) the PipelineJob CRD generated from conveyor.spec")
    crd.add_argument("--write", action="store_true", help="write crds/ and the chart's copy")
    crd.add_argument("--check", action="store_true", help="exit 1 when the checked-in CRD files differ")

    op = sub.add_parser("operator", help="run the Kubernetes operator (wraps `kopf run`)")
    op.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch only this namespace (repeatable; glob allowed)",
    )
    op.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (the default)")
    op.add_argument("--standalone", action="store_true", help="no peering (no leader election)")
    op.add_argument("--peering", default="conveyor", help="kopf peering object used for leader election")
    op.add_argument(
        "--priority", type=int, default=None, help="peering priority; default: random per replica"
    )
    op.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics; 0 turns it off")
    op.add_argument(
        "--health-port", type=int, default=8081, help="liveness endpoint /healthz; 0 turns it off"
    )
    op.add_argument("--verbose", action="store_true")
    return parser


def _resolve(target: str) -> Callable[[argparse.Namespace], int]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)  # type: ignore[no-any-return]


# Conveyor reads models from local directories only (no downloads at run time). Left online, the
# HF hub's clients may look for a network before reading a local file: on a host that cannot reach
# one, that cost seconds per process in the pre-flight and again in every rank. The worker image sets
# the same (deploy/Dockerfile.worker); a user's own setting wins.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("run", "worker", "generate"):
        from conveyor import bytecode_cache

        bytecode_cache.enable()  # before torch, pydantic or transformers is imported
        for name, value in OFFLINE.items():  # before anything imports huggingface_hub (read at import)
            os.environ.setdefault(name, value)
    return int(_resolve(_COMMANDS[args.command])(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
