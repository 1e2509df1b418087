"""One way to build a generation rank: load its stage and shard, quantize, add the tensor-parallel
all-reduces, allocate the KV cache, then warm up (tune, compile, capture) before the first request.

``conveyor generate``, the batch job, the benchmarks and the tests all build ranks here, so a limit
checked for one (a prompt too long for the model) holds for all, and every one of them starts as fast
as the benchmark measures. Warm-up phases are timed, logged and exported
(``conveyor_warmup_seconds{phase}``); a rank reports ready only after warm-up.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from conveyor.inference.kernels.cuda_graphs import CompiledStage, CompileOptions, WarmUpReport
from conveyor.inference.model.stage_model import StageModel
from conveyor.inference.pipeline.stage import PipelinePeers
from conveyor.log import get_logger

log = get_logger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PromptTooLongError(ValueError):
    pass


@dataclasses.dataclass
class GenerationRank:
    """A rank ready to generate: its stage model (warmed up), its peers and its micro-batch layout."""

    model: StageModel
    peers: PipelinePeers
    micro_batches: int
    lanes_per_micro_batch: int
    max_len: int
    seconds: dict[str, float]  # by phase: load, tune, compile, capture
    warm_up: WarmUpReport | None = None

    @property
    def compiled(self) -> CompiledStage:
        return CompiledStage.of(self.model)


def cache_length(longest_prompt: int, max_new_tokens: int, max_positions: int) -> int:
    """KV positions a run needs: the longest prompt and its new tokens, at most the model's positions;
    refuses a prompt that leaves no room for a token."""
    if longest_prompt >= max_positions:
        raise PromptTooLongError(
            f"a prompt of {longest_prompt} tokens does not fit the model's {max_positions} positions "
            f"(at most {max_positions - 1}, leaving one for a new token)"
        )
    return min(longest_prompt + max_new_tokens, max_positions)


def kv_cache_storage(name: str, device: torch.device) -> torch.dtype | None:
    """``spec.model.kvCacheDtype`` as the cache's storage dtype (None: the compute dtype), refused with
    the field and the fix on a GPU that cannot compute with it (before any weight is read)."""
    from conveyor.inference.model.kv_cache import KV_CACHE_DTYPES
    from conveyor.inference.validate import InputError

    if name not in KV_CACHE_DTYPES:
        raise InputError(f"spec.model.kvCacheDtype: {name!r} is not one of {list(KV_CACHE_DTYPES)}")
    dtype = KV_CACHE_DTYPES[name]
    if dtype is not None and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):  # float8 conversions in Triton (the kernels, inductor's code) need sm_89
            raise InputError(
                f"spec.model.kvCacheDtype: {name} needs a GPU of compute capability 8.9 or newer (Ada, "
                f"Hopper); {torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}: use auto"
            )
    return dtype


def prepare_compiler(options: CompileOptions, cache_dir: Path | None) -> None:
    """What warm-up needs of the compiler and nothing of the model: its settings (compile_cache.py),
    its heavy imports (inductor's ``compile_fx``, Triton and the decode kernels; 2.2-2.5 s of a cold
    rank's start on an H200) and inductor's compile workers. A batch job's rank does this while it
    waits at the pre-flight gate, so it overlaps the checks; ``build_generation_rank`` calls it again,
    at no cost."""
    if not (options.compile or options.cuda_graphs):
        return
    from conveyor.inference.kernels import compile_cache

    compile_cache.configure(cache_dir)
    if options.compile:
        import torch._inductor.compile_fx  # noqa: F401
        from torch._inductor.async_compile import maybe_warm_pool

        # Inductor compiles in its worker processes only once they are up, and serially in this one
        # until then; torch starts them when backend="inductor" is chosen, never for our own backend.
        # Started here, they import torch while the rank waits and loads (TORCH_WARM_POOL=0: not).
        maybe_warm_pool()
    if options.triton_kernels:
        from conveyor.inference.kernels import decode_attention, skinny_matmul  # noqa: F401


def prepare_rank(
    model_dir: str,
    topo: Any,
    *,
    dtype: torch.dtype,
    device: torch.device,
    lanes: int,
    max_len: int,
    policy: Any = None,
    quantization: str = "none",
    kv_cache_dtype: str = "auto",
) -> tuple[StageModel, PipelinePeers]:
    """Load this rank's stage and shard of ``model_dir`` (``quantization`` "int8": weight-only, see
    quantize.py), add the tensor-parallel all-reduces and allocate the KV cache (``lanes`` x ``max_len``,
    stored as ``kv_cache_dtype`` says: kv_cache.py). No warm-up: ``build_generation_rank`` does both."""
    from conveyor.inference.model.families import load_arch
    from conveyor.inference.model.loader import Shard, load_stage
    from conveyor.inference.pipeline.quantize import QUANTIZATIONS, quantize_int8
    from conveyor.inference.pipeline.tensor_parallel import add_all_reduce_hooks

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not one of {list(QUANTIZATIONS)}")
    kv_dtype = kv_cache_storage(kv_cache_dtype, device)
    arch = load_arch(model_dir)
    t = topo.layout.tensor_parallel
    group = topo.tensor_group if t > 1 else None
    model = load_stage(
        model_dir,
        arch,
        stages=topo.num_stages,
        stage=topo.stage,
        shard=Shard(topo.tp_rank, t),
        dtype=dtype,
        # int8: the shard is loaded on the host and quantized onto the device linear by linear, so the
        # device never holds the full-precision weights
        device=torch.device("cpu") if quantization == "int8" else device,
        policy=policy,
    )
    if quantization == "int8":
        quantize_int8(model, tensor_group=group, device=device)
        model.to(device)  # embeddings, norms, head (in place: a tied head stays tied)
    if t > 1:  # after quantizing: the hooks belong on the modules that run
        add_all_reduce_hooks(model, group)
    model.setup_cache(lanes, max_len, dtype, device, kv_dtype)
    return model, PipelinePeers.from_topology(topo)


def build_generation_rank(
    model_dir: str,
    topo: Any,
    *,
    dtype: torch.dtype,
    device: torch.device,
    micro_batches: int,
    lanes_per_micro_batch: int,
    max_len: int,
    options: CompileOptions,
    cache_dir: Path | None = None,
    quantization: str = "none",
    kv_cache_dtype: str = "auto",
    policy: Any = None,
    on_phase: Callable[[str, float], None] | None = None,
) -> GenerationRank:
    """Load, then warm up: when this returns, nothing compiles, tunes or captures for the rest of the
    run, whatever the prompt lengths and context up to ``max_len``. ``cache_dir``: the persistent
    compile cache (compile_cache.py; None: inductor's default, no tile choices kept). ``on_phase(name,
    seconds)`` is called as each phase ends."""
    from conveyor.inference.kernels import compile_cache

    seconds: dict[str, float] = {}

    def phase(name: str, value: float) -> None:
        seconds[name] = seconds.get(name, 0.0) + value
        if on_phase is not None:
            on_phase(name, seconds[name])

    t0 = time.perf_counter()
    prepare_compiler(options, cache_dir)  # imports inductor: counted as setup (unless done before)
    phase("setup", time.perf_counter() - t0)
    t0 = time.perf_counter()
    model, peers = prepare_rank(
        model_dir,
        topo,
        dtype=dtype,
        device=device,
        lanes=micro_batches * lanes_per_micro_batch,
        max_len=max_len,
        policy=policy,
        quantization=quantization,
        kv_cache_dtype=kv_cache_dtype,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    phase("load", time.perf_counter() - t0)
    t0 = time.perf_counter()
    stage = CompiledStage.attach(model, options)
    phase("setup", time.perf_counter() - t0)
    tiles = None
    if cache_dir is not None and device.type == "cuda" and options.triton_kernels:
        tiles = compile_cache.TileChoices.for_device(cache_dir, device)
    report = stage.warm_up(lanes_per_micro_batch, tiles, phase)
    return GenerationRank(model, peers, micro_batches, lanes_per_micro_batch, max_len, seconds, report)
