"""A stage's forward on a GPU: warmed up once, then nothing compiles, tunes or captures.

Decode on a 7B model is about 1,400 small kernels per token when run eagerly; launched from Python
they cost more than the HBM reads they do (measured on an H200 at batch 1: 16.9 ms eager, 6.5 ms as a
CUDA graph, 5.7 ms of it kernels, against a 3.1 ms roofline). torch.compile fuses the elementwise work
(norms, rotary, residuals, softmax) into a few kernels per layer; the graph removes the launch gaps.

Warm start (docs/inference.md): every shape a run will see is made at ``warm_up``, before the first
request, and a job never stalls mid-run to compile (issue: a batch job spent minutes compiling and
capturing as its context grew, one CUDA graph per 64 positions and 31 recompiles).

* Decode: the step's shapes are the micro-batch's alone. Which cache lanes it uses and how far each
  query reads are device data (``lanes`` [n], ``positions`` [n, 1]): the attention kernel sizes its
  key splits for the whole cache and ends each query's loop at its own position. So one compile
  (static shapes, ``dynamic=False``) and one CUDA graph per micro-batch size serve every micro-batch
  and every context length. The compile is regional too: one layer, reused for every layer, with the
  embedding and head around it left eager inside the same graph (a whole 32-layer step took dynamo
  seconds to trace at every start and inductor most of a cold start to lower; the layers are the
  same code, and the graph replays eager and compiled kernels alike).
* Prompt passes (prefills and the chunks of a long prompt) are compute-bound, so one transformer layer
  is compiled with dynamic shapes and reused for every layer (regional compilation: seconds instead of
  a whole-model compile). Only sizes 0 and 1 get their own graphs in dynamo, so the passes are padded
  to at least two tokens (generate.py) and warm-up compiles one and several prompts.
* Before decode is compiled, the plain linear layers are routed through skinny_matmul.py, which
  measures cuBLAS against its Triton tiles for each weight shape at the micro-batch size and keeps the
  faster (the choices persist in the compile cache: compile_cache.py).

After warm-up, prompt passes run under ``torch.compiler.set_stance("eager_on_recompile")``: a shape
that warm-up missed runs uncompiled rather than stalling the run for a compile, and ``late`` counts
it (compiles and captures after warm-up; a test asserts zero).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conveyor.inference.kernels import elementwise, packed_attention
from conveyor.inference.kernels.side_stream import warm_up
from conveyor.inference.model.kv_cache import KVCache, LayerCache
from conveyor.inference.model.stage_model import Block, StageModel, Step

log = logging.getLogger(__name__)


def _flag(environ: Mapping[str, str], name: str, default: bool = True) -> bool:
    if name not in environ:
        return default
    return environ[name].strip().lower() not in ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """How a stage's passes run; read once at an entry point (``from_env``) and passed down."""

    cuda_graphs: bool = True  # decode replayed from CUDA graphs (CUDA only)
    compile: bool = True  # torch.compile the decode step's layer
    compile_prompts: bool = True  # and the prompt passes' (compute-bound: cuBLAS's either way)
    triton_kernels: bool = True  # skinny_matmul's products and the decode attention kernel (CUDA only)
    pack_prompts: bool = True  # eager prefills of several prompts without their padding (CUDA only)
    # SDPA's cuDNN backend in prompt passes: off, as it builds a plan for every new shape (PROMPT_SDPA)
    cudnn_attention: bool = False
    after_warm_up: str = "eager_on_recompile"  # torch.compiler stance for prompt passes after warm-up

    @classmethod
    def from_env(
        cls, device: torch.device, environ: Mapping[str, str] = os.environ, *, compile_prompts: bool = True
    ) -> CompileOptions:
        """``CONVEYOR_CUDA_GRAPHS=0`` (graphs and compiling off), ``CONVEYOR_TORCH_COMPILE=0``,
        ``CONVEYOR_COMPILE_PROMPTS=0|1`` (default ``compile_prompts``), ``CONVEYOR_TRITON_KERNELS=0``,
        ``CONVEYOR_PACK_PROMPTS=0``, ``CONVEYOR_CUDNN_ATTENTION=1``; on the CPU everything runs eagerly."""
        if device.type != "cuda":
            return EAGER
        graphs = _flag(environ, "CONVEYOR_CUDA_GRAPHS")
        return cls(
            cuda_graphs=graphs,
            compile=graphs and _flag(environ, "CONVEYOR_TORCH_COMPILE"),
            compile_prompts=_flag(environ, "CONVEYOR_COMPILE_PROMPTS", compile_prompts),
            triton_kernels=_flag(environ, "CONVEYOR_TRITON_KERNELS"),
            pack_prompts=_flag(environ, "CONVEYOR_PACK_PROMPTS"),
            cudnn_attention=_flag(environ, "CONVEYOR_CUDNN_ATTENTION", False),
        )


# The SDPA backends a prompt pass may use. cuDNN's builds an execution plan for each new shape (prompts
# per pass, longest prompt): tens of milliseconds each (flashinfer measured 55-70 ms on a B200), and a
# job's or a serve replica's prompt passes rarely repeat a shape. Flash attention only launches; the
# memory-efficient kernel takes what flash does not (an explicit mask: a later chunk of a long prompt).
PROMPT_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

EAGER = CompileOptions(
    cuda_graphs=False, compile=False, compile_prompts=False, triton_kernels=False, pack_prompts=False
)


@dataclasses.dataclass
class _Captured:
    inputs: torch.Tensor
    positions: torch.Tensor
    lanes: torch.Tensor
    output: torch.Tensor
    graph: torch.cuda.CUDAGraph


@dataclasses.dataclass
class WarmUpReport:
    """Seconds per phase, and what was made."""

    seconds: dict[str, float]
    compiles: int
    captures: int
    tuned_shapes: int


class CompiledStage:
    """Runs a stage model's passes. ``decode(inputs, positions, lanes, kv_len)``: one token per lane,
    replayed from a CUDA graph where graphs are on; its output is a static buffer, valid until the
    next decode of the same shape. ``prompt(...)``: a prefill or a prompt chunk, its layers compiled.
    Both run the model eagerly where compiling and graphs are off (the CPU)."""

    def __init__(self, model: StageModel, options: CompileOptions = EAGER):
        self.model, self.options = model, options
        cuda = any(p.is_cuda for p in model.parameters())
        self.graphs = options.cuda_graphs and cuda and torch.cuda.is_available()
        self.compiling = options.compile
        self.counts: Counter[str] = Counter()  # compiles, captures (all) and late_* (after warm-up)
        self.warm = False
        self.uncompiled: set[str] = set()  # "prompt", "decode": what fell back to eager, compile failing
        self._graphs: dict[tuple[tuple[int, ...], torch.dtype], _Captured] = {}
        self._cache: KVCache | None = None  # the cache the graphs write (setup_cache replaces it)
        self._weights = _weight_storage(model)  # where the graphs read the weights (.to() moves them)
        self._pool: Any = None  # one memory pool shared by every graph of this stage
        self._decode_layer: Callable[..., torch.Tensor] | None = None
        self._layer: Callable[..., torch.Tensor] | None = None
        self._fused_modules = 0  # modules that run elementwise.py's kernels in eager passes
        self._kernel_variants = 0  # of those kernels, compiled by the end of warm-up
        self._prompt_sdpa = PROMPT_SDPA if cuda and not options.cudnn_attention else None
        if options.triton_kernels and cuda:
            from conveyor.inference.kernels import decode_attention

            model.decode_kernel = decode_attention.attend
            self._fused_modules = elementwise.install(model)
        if options.pack_prompts and cuda and model.compute_dtype in (torch.bfloat16, torch.float16):
            # eager prefills skip their padding (flash attention's kernel: 16-bit; float32 would run
            # attention once per prompt)
            model.packed_attention = packed_attention.attend
        if self.compiling:
            # static: a decode step's shapes never change (kv_len is not an argument: see the docstring)
            self._decode_layer = torch.compile(
                _decode_layer_pass, dynamic=False, fullgraph=True, backend=self._backend
            )
        if self.compiling and options.compile_prompts:
            # fullgraph: a graph break would start a frame of the model's own code, whose shape history
            # decode shares
            self._layer = torch.compile(_layer_pass, dynamic=True, fullgraph=True, backend=self._backend)

    @classmethod
    def of(cls, model: StageModel) -> CompiledStage:
        """The model's own (``attach``ed by the rank builder; eager if none was). A server generates
        again and again: compiled code and graphs serve every later generation on the model."""
        stage = model.__dict__.get("_compiled_stage")
        if stage is None:
            stage = cls.attach(model, EAGER)
        weights = _weight_storage(model)
        if weights != stage._weights:  # moved or cast since the graphs were captured: they read freed memory
            stage._graphs, stage._pool, stage._weights = {}, None, weights
            stage.warm = False
        return stage

    @classmethod
    def attach(cls, model: StageModel, options: CompileOptions) -> CompiledStage:
        stage = model.__dict__["_compiled_stage"] = cls(model, options)
        return stage

    def _backend(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        from torch._inductor.compile_fx import compile_fx

        self._count("compiles")
        return compile_fx(graph, example_inputs)

    def count_late_kernels(self) -> int:
        """Counts (as late compiles) the variants of elementwise.py's kernels compiled since warm-up:
        none, unless a pass met a width or dtype warm-up did not."""
        late = elementwise.compiled_variants() - self._kernel_variants
        for _ in range(late if self.warm else 0):
            self._count("compiles")
        self._kernel_variants += late
        return late

    def _count(self, what: str) -> None:
        self.counts[what] += 1
        if self.warm:
            self.counts[f"late_{what}"] += 1
            log.warning("%s after warm-up: a shape warm-up did not make (counted as late_%s)", what, what)

    # -- the passes -----------------------------------------------------------------------------
    def prompt(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        lanes: torch.Tensor,
        prefill: bool = False,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        with sdpa_kernel(self._prompt_sdpa) if self._prompt_sdpa else contextlib.nullcontext():
            return self._prompt(inputs, positions, lanes, prefill, kv_len)

    def _prompt(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        lanes: torch.Tensor,
        prefill: bool,
        kv_len: int | None,
    ) -> torch.Tensor:
        if self._layer is None:
            return self.model(inputs, positions, prefill=prefill, kv_len=kv_len, lanes=lanes)
        self._check_cache()
        inputs, positions, lanes = _inference_tensors(inputs, positions, lanes)
        try:
            with torch.compiler.set_stance(self.options.after_warm_up if self.warm else "default"):
                return self.model(
                    inputs, positions, prefill=prefill, kv_len=kv_len, lanes=lanes, run_layer=self._layer
                )
        except Exception as e:  # what inductor cannot compile still runs, uncompiled
            out = self.model(
                inputs, positions, prefill=prefill, kv_len=kv_len, lanes=lanes
            )  # bad input raises
            log.warning("torch.compile failed (%s: %s); prompts run uncompiled", type(e).__name__, e)
            self._layer = None
            self.uncompiled.add("prompt")
            return out

    def decode(
        self, inputs: torch.Tensor, positions: torch.Tensor, lanes: torch.Tensor, kv_len: int
    ) -> torch.Tensor:
        if not self.graphs or inputs.device.type != "cuda" or positions.shape[1] != 1:
            if self._decode_layer is None:  # eager: read only the keys in use
                return self.model(inputs, positions, kv_len=kv_len, lanes=lanes)
            return self._decode_step(*_inference_tensors(inputs, positions, lanes))
        self._check_cache()
        key = (tuple(inputs.shape), inputs.dtype)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(inputs, positions, lanes)
        captured.inputs.copy_(inputs)
        captured.positions.copy_(positions)
        captured.lanes.copy_(lanes)
        captured.graph.replay()
        return captured.output

    def _decode_step(
        self, inputs: torch.Tensor, positions: torch.Tensor, lanes: torch.Tensor
    ) -> torch.Tensor:
        return self.model(inputs, positions, lanes=lanes, run_layer=self._decode_layer)

    def _check_cache(self) -> None:
        cache = self.model.cache
        if self._cache is cache or cache is None:
            return
        # a new cache: the graphs write the old one; its shape is fixed, so kept out of dynamic shapes
        self._graphs, self._pool, self._cache = {}, None, cache
        for t in cache.tensors():
            torch._dynamo.mark_static(t)

    def _capture(self, inputs: torch.Tensor, positions: torch.Tensor, lanes: torch.Tensor) -> _Captured:
        self._count("captures")
        static = [inputs.clone(), positions.clone(), lanes.clone()]
        for t in static:
            torch._dynamo.mark_static(t)
        # Re-running a decode step writes the same K/V at the same positions: warming up is idempotent.
        try:
            warm_up(lambda: self._decode_step(*static), times=2)
        except Exception as e:  # a model or build inductor cannot compile still runs, uncompiled
            if self._decode_layer is None:
                raise
            log.warning("torch.compile failed (%s: %s); the decode step runs uncompiled", type(e).__name__, e)
            self._decode_layer = None
            self.uncompiled.add("decode")
            warm_up(lambda: self._decode_step(*static), times=2)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self._decode_step(*static)
        self._pool = graph.pool()
        return _Captured(static[0], static[1], static[2], output, graph)

    # -- warm-up --------------------------------------------------------------------------------
    def warm_up(
        self, micro_batch: int, tile_choices: Any = None, on_phase: Callable[[str, float], None] | None = None
    ) -> WarmUpReport:
        """Make everything a run needs before its first request: the linear layers' tile choices for
        ``micro_batch`` rows (``tile_choices``: a compile_cache.TileChoices that loads and saves them),
        the compiled prompt layer (one and several prompts; first passes and later chunks), the compiled
        decode step and its CUDA graph. Writes only the cache's scratch slots. ``on_phase(name, seconds)``
        as each phase ends (a phase may end more than once: its seconds add up)."""
        from conveyor.inference.kernels import skinny_matmul

        model, cache = self.model, self.model.cache
        assert cache is not None, "setup_cache() before warm_up()"
        if micro_batch > cache.lanes_total:
            raise ValueError(
                f"a micro-batch of {micro_batch} lanes needs a cache of as many (has {cache.lanes_total})"
            )
        self.warm = False  # (again, for another micro-batch size: what it makes is not late)
        seconds: dict[str, float] = {}
        counts_before = Counter(self.counts)
        tuned = 0

        def phase(name: str, t0: float) -> None:
            elapsed = time.perf_counter() - t0
            seconds[name] = seconds.get(name, 0.0) + elapsed
            if on_phase is not None:
                on_phase(name, elapsed)

        t0 = time.perf_counter()
        if self.options.triton_kernels and self.graphs:
            products = skinny_matmul.route_linears(model)
            if tile_choices is not None:
                tile_choices.load()
            tuned = skinny_matmul.tune(products, micro_batch)
            if tile_choices is not None and tuned:
                tile_choices.save()
        phase("tune", t0)

        device = cache.k[0].device if cache.k else torch.device("cpu")
        scratch = cache.scratch_position

        def inputs(n: int, s: int) -> torch.Tensor:
            if model.first:
                return torch.zeros(n, s, dtype=torch.int64, device=device)
            return torch.zeros(n, s, model.arch.hidden, dtype=model.compute_dtype, device=device)

        t0 = time.perf_counter()
        with torch.inference_mode():
            if self._layer is not None:
                # prefills of one and of several prompts, and a later chunk of a long prompt (always one:
                # generate.py chunks one prompt at a time), all tokens at the scratch slot. A sliding
                # window also masks a prefill longer than the window, as a chunk is masked: several then.
                for n in (1, min(2, cache.lanes_total)):
                    positions = torch.full((n, 2), scratch, dtype=torch.int64, device=device)
                    lanes = torch.arange(n, device=device)
                    self.prompt(inputs(n, 2), positions, lanes, prefill=True)
                    if n == 1 or model.arch.sliding_window:
                        self.prompt(inputs(n, 2), positions, lanes, kv_len=min(64, cache.length))
            elif self._fused_modules:  # eager prompt passes: their kernels (elementwise.py) compile now
                positions = torch.full((1, 2), scratch, dtype=torch.int64, device=device)
                self.prompt(inputs(1, 2), positions, torch.arange(1, device=device), prefill=True)
            if self._layer is None and model.packed_attention is not None:
                # flash attention's variable-length kernel loads on its first call: 6.4 s on an H100
                # (benchmarks/attention_shapes.py), which would land on a job's first packed prefill.
                # Called on its own: a packed pass's real tokens would write real cache slots.
                heads, kv_heads, d = model.arch.heads, model.arch.kv_heads, model.arch.head_dim
                q = torch.zeros(2, heads, d, dtype=model.compute_dtype, device=device)
                kv = torch.zeros(2, kv_heads, d, dtype=model.compute_dtype, device=device)
                cu_seqlens = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
                model.packed_attention(q, kv, kv, cu_seqlens, 1, d**-0.5)
            phase("compile", t0)
            t0 = time.perf_counter()
            positions = torch.full((micro_batch, 1), scratch, dtype=torch.int64, device=device)
            self.decode(inputs(micro_batch, 1), positions, torch.arange(micro_batch, device=device), 1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        # the decode compile happens inside its first capture (or first call): counted as capture time
        phase("capture" if self.graphs else "compile", t0)
        self.warm = True
        self._kernel_variants = elementwise.compiled_variants()
        made = self.counts - counts_before
        report = WarmUpReport(seconds, made["compiles"], made["captures"], tuned)
        log.info(
            "warm-up done",
            extra={
                "seconds": {k: round(v, 2) for k, v in seconds.items()},
                "compiles": report.compiles,
                "captures": report.captures,
                "tuned_shapes": tuned,
            },
        )
        return report


def _inference_tensors(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors as inference tensors (a copy of those that are not): dynamo guards on a tensor's
    dispatch keys, and a pass's inputs come from a receive buffer or the host as often as from a
    pass under inference mode; one kind keeps them to the graphs warm-up made."""
    with torch.inference_mode():
        return [t if t.is_inference() else t.clone() for t in tensors]


def _weight_storage(model: StageModel) -> list[tuple[int, torch.dtype]]:
    return [(t.data_ptr(), t.dtype) for t in (*model.parameters(), *model.buffers())]


def _decode_layer_pass(layer: Block, x: torch.Tensor, step: Step, cache: LayerCache | None) -> torch.Tensor:
    # its own code object, the same as _layer_pass: dynamo keeps shape history per code object, so the
    # prompt layer's dynamic shapes never reach the decode step's static ones
    return layer(x, step, cache)


def _layer_pass(layer: Block, x: torch.Tensor, step: Step, cache: LayerCache | None) -> torch.Tensor:
    return layer(x, step, cache)
