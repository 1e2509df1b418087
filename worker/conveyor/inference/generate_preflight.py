"""Pre-flight of ``conveyor generate``: its flags, the model directory and the prompts, checked in the
command's own process before any rank starts, as a batch job's are (validate.py).

Why here and not in the ranks: a refusal in a rank comes after every rank has started, joined the
process group and begun loading weights, and each of them prints it (a traceback per rank for a
damaged safetensors file, an empty prompt or ``--max-new-tokens 0``); a flag out of range could even
start nothing and exit 0 (``--stages 0``). Each refusal is one ``InputError`` naming the flag and the
fix; the command prints it once and exits 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from conveyor.inference.model.families import Arch
from conveyor.inference.validate import InputError, ModelFields, check_model, load_tokenizer_checked

FLAGS = ModelFields(path="--model", stages="--stages", tensor_parallel="--tensor-parallel")


def check_flags(args: argparse.Namespace) -> None:
    """The numeric flags' ranges (argparse checks only their types)."""
    if args.stages < 1:
        raise InputError(f"--stages must be >= 1, got {args.stages}")
    if args.tensor_parallel < 1:
        raise InputError(f"--tensor-parallel must be >= 1, got {args.tensor_parallel}")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1 (the tokens to generate), got {args.max_new_tokens}")
    if args.temperature < 0:
        raise InputError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.top_k < 0:
        raise InputError(f"--top-k must be >= 0 (0: no limit), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise InputError(f"--top-p must be in (0, 1] (1: no limit), got {args.top_p}")


def check_device(requested: str, ranks: int) -> None:
    """``--device cuda`` on a machine without CUDA, and more ranks than GPUs where the ranks would use
    them: each rank takes GPU ``LOCAL_RANK % count`` and NCCL refuses two ranks on one GPU, in every
    rank after it started."""
    if requested == "cpu":
        return
    import torch

    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise InputError("--device cuda: CUDA is not available on this machine; use --device cpu (or auto)")
    if available and ranks > torch.cuda.device_count():
        raise InputError(
            f"--stages x --tensor-parallel = {ranks} ranks, one GPU each, but this machine has "
            f"{torch.cuda.device_count()}: use fewer stages or a smaller tensor-parallel size, or --device cpu"
        )


def check_prompts(prompts: list[str], model_dir: str, arch: Arch, cache_dir: Path | None) -> None:
    """Every prompt tokenizes to at least one token and leaves room for one new token."""
    tokenizer = load_tokenizer_checked(model_dir, cache_dir)
    if tokenizer is None:
        raise InputError(f"--model: {model_dir} has no tokenizer (tokenizer.json): text prompts need one")
    for number, prompt in enumerate(prompts, start=1):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as err:  # argv bytes that are not UTF-8 arrive as lone surrogates
            raise InputError(
                f"--prompt {number}: character {err.start + 1} is not UTF-8 (byte "
                f"0x{ord(prompt[err.start]) & 0xFF:02x}); pass the prompt as UTF-8 text"
            ) from None
        length = len(tokenizer(prompt)["input_ids"])
        if length == 0:
            raise InputError(f"--prompt {number} ({prompt!r}) tokenizes to nothing: give some text")
        if length >= arch.max_positions:
            raise InputError(
                f"--prompt {number} has {length} tokens; the model has {arch.max_positions} positions and "
                "at least one new token must fit: shorten it"
            )


def preflight_generate(args: argparse.Namespace, cache_dir: Path | None = None) -> Arch:
    """Everything ``conveyor generate`` can refuse before a rank starts; returns the model's ``Arch``."""
    check_flags(args)
    arch = check_model(args.model, args.stages, args.tensor_parallel, cache_dir, FLAGS)  # (causal too)
    check_device(args.device, args.stages * args.tensor_parallel)
    check_prompts(args.prompt, args.model, arch, cache_dir)
    return arch
