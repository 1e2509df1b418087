"""The batch inference job: ``run_rank(pod, local_rank)`` is what each rank process of a
``mode: inference`` PipelineJob runs, in a pod or under ``conveyor run``.

Replica r takes every R-th prompt of ``spec.inference.input`` (r, r + R, ...). Rank 0 of the replica
(stage 0, tp 0) reads the input and its committed progress, and hands the pending prompts to the
group; stage 0 schedules, the last stage samples, rank 0 appends results to the output as they
complete and commits them (progress.py). With one replica the output is ``spec.inference.output``
itself; with R > 1 each replica writes ``<output>.r<r>`` and whoever finishes last merges the parts
into the output atomically. A restart skips committed prompts and repeats nothing; a restart after
completion exits 0 at once.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from conveyor import metrics
from conveyor.commit_protocol import rfc3339, write_termination_message
from conveyor.distributed import destroy_distributed, init_distributed
from conveyor.env import PodEnv
from conveyor.inference import profiling
from conveyor.inference.kernels.cuda_graphs import CompileOptions
from conveyor.inference.model.tokenizer_cache import load_tokenizer
from conveyor.inference.pipeline.generate import (
    BATCH,
    IMMEDIATE,
    Admission,
    Request,
    Result,
    SchedulerHooks,
    micro_batch_layout,
    run_generation,
)
from conveyor.inference.pipeline.sampling import SamplingParams
from conveyor.inference.progress import ResultLog, ResultsError, file_digest, job_identity, merge_parts
from conveyor.inference.rank_builder import (
    DTYPES,
    PromptTooLongError,
    build_generation_rank,
    cache_length,
    prepare_compiler,
)
from conveyor.inference.run_progress import RunProgress
from conveyor.inference.validate import InputError, check_fits, read_rows, tokenized
from conveyor.log import get_logger
from conveyor.preflight_gate import wait_at_gate
from conveyor.stop_points import RESULTS_DONE, STOP_POINTS
from conveyor.topology import Layout, Topology
from conveyor.watchdog import PROGRESS

if TYPE_CHECKING:
    from conveyor.inference.model.families import Arch

__all__ = ["InputError", "load_tokenizer", "read_requests", "run_rank", "sampling_params"]
log = get_logger(__name__)
COMMIT_SECONDS = 10.0  # commit at least this often, even between `checkpoint.every` results
LOG_SECONDS = 5.0


def read_requests(
    path: str, replica: int, replicas: int, tokenizer: Any, max_new_tokens: int, arch: Arch
) -> list[Request]:
    """This replica's share of the input JSONL (every R-th prompt), in order, checked as the pre-flight
    checks it (validate.py: ids unique, token ids integers inside the vocabulary, prompts that fit)."""
    rows = read_rows(path, arch, max_new_tokens)
    mine = (item for index, item in enumerate(rows) if index % replicas == replica)
    requests = []
    for number, row, ids in tokenized(path, mine, tokenizer):
        check_fits(path, number, row, len(ids), arch.max_positions)
        requests.append(Request(row.id, ids, row.max_new_tokens or max_new_tokens))
    return requests


# Compiled prompt passes fuse the eager prefill's elementwise work. On an H200 (7B shape, batch 256,
# benchmarks/job.py, 2026-12-04) they saved 0.9-1.3 s of generation per 147k prompt tokens and cost
# 4.0 s of warm-up with a warm cache, 11.5 s without: they pay from about a million prompt tokens.
COMPILE_PROMPTS_FROM_TOKENS = 1_000_000


def compiling_prompts_pays(prompt_tokens: int) -> bool:
    """Whether a batch job of ``prompt_tokens`` still to prefill compiles its prompt passes (a job
    prefills each prompt once; ``CONVEYOR_COMPILE_PROMPTS`` decides instead where set)."""
    return prompt_tokens >= COMPILE_PROMPTS_FROM_TOKENS


def admission_from_env(environ: Any = os.environ) -> Admission:
    """When waiting prompts join (generate.Admission): ``BATCH`` unless ``CONVEYOR_ADMISSION=immediate``
    (to compare the two, benchmarks/job.py)."""
    value = environ.get("CONVEYOR_ADMISSION", "batch").strip().lower()
    if value not in ("batch", "immediate"):
        raise InputError(f"CONVEYOR_ADMISSION={value!r}: use batch (the default) or immediate")
    return BATCH if value == "batch" else IMMEDIATE


def sampling_params(spec: Any, eos: tuple[int, ...]) -> SamplingParams:
    s = spec.inference.sampling
    return SamplingParams(
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        repetition_penalty=s.repetition_penalty,
        seed=s.seed,
        stop_token_ids=tuple(dict.fromkeys([*s.stop_token_ids, *eos])),  # the model's EOS too, as HF does
        stop=tuple(s.stop),
    )


def write_termination(completed: bool, step: int) -> None:
    path = os.environ.get("CONVEYOR_TERMINATION_LOG")
    if not path:
        return
    write_termination_message(path, completed, {"step": step, "time": rfc3339()})


class StartupClock:
    """Seconds per start-up phase, each timed from the end of the one before (the first from the
    process's start, when known): logged with "inference starting"."""

    def __init__(self, started: float | None) -> None:
        self._mark = time.monotonic()
        self.seconds: dict[str, float] = {} if started is None else {"import": self._mark - started}

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = now - self._mark
        self._mark = now


def pending_work(pod: PodEnv, results: ResultLog, output: Path, tokenizer: Any, arch: Arch) -> dict[str, Any]:
    """Rank 0's decision, broadcast to the group: ``{"done", "completed", "requests"}`` (this replica's
    prompts not yet committed, longest first) or ``{"error"}`` (bad input, one line)."""
    spec, replicas = pod.spec, max(pod.replicas, 1)
    assert spec.inference is not None
    merged = output if replicas > 1 else None
    try:
        results.lock(merged)  # held until this process ends: a second run of the output is refused
        results.check(merged, spec.inference.input)
        if results.done:
            if merged is None:
                results.check_committed()  # (with replicas, the parts may be removed once merged)
            elif not merged.exists():  # the writer died before it could merge
                merge_parts(replica_parts(merged, replicas), merged, by=results)
            return {"done": True, "completed": results.completed, "requests": []}
        committed = results.committed_ids()
        inf = spec.inference
        todo = read_requests(inf.input, pod.replica, replicas, tokenizer, inf.max_new_tokens, arch)
        assert results.identity is not None
        if file_digest(Path(inf.input)) != results.identity["input"]:
            # the identity was taken as the rank started: prompts read from another file than the one
            # recorded would be committed as its (a replica's share is every R-th line of it)
            raise ResultsError(
                f"{inf.input} changed while the job started (after its digest was taken, before its "
                "prompts were read): nothing was computed; leave it as it is while the job runs and start "
                "it again"
            )
        todo = [r for r in todo if json.dumps(r.id) not in committed]
        # Longest first: prompts admitted together are prefilled as one pass padded to the longest, so
        # neighbours of like length waste no compute on padding (prompts of 32-255 tokens in input
        # order: 1.75 tokens computed per prompt token, sorted 1.05); results are keyed by id, so their
        # order is free.
        todo.sort(key=lambda r: len(r.prompt_ids), reverse=True)
        return {"done": False, "completed": len(committed), "requests": todo}
    except InputError as err:
        return {"error": str(err)}


class Commits:
    """Commits on a thread of their own, so that the scheduler's thread, which keeps the GPU fed, never
    waits on the disk. A commit is three fsyncs (0.8 ms each on this machine's disk, several on a
    network volume), and with ``checkpoint.every`` 1 (a job without a checkpoint section) a wave of 256
    results that end at one decode step committed 256 times between that step and the next. ``request``
    asks for a commit of what is appended by then; requests that arrive during a commit coalesce into
    the next one. A commit that fails is raised on the scheduler's thread, at its next request or at
    ``close``: the job then fails, and a restart recomputes what was not committed."""

    def __init__(self, commit: Callable[[], None]) -> None:
        self._commit = commit
        self._wanted = threading.Event()
        self._closing = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="result-commits", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closing:
                return
            try:
                self._commit()
            except BaseException as err:  # noqa: BLE001 (raised on the scheduler's thread)
                self._error = err
                return

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def request(self) -> None:
        self._raise()
        self._wanted.set()

    def close(self) -> None:
        """Stop the thread (after the commit under way, if any); the caller commits the rest itself."""
        self._closing = True
        self._wanted.set()
        self._thread.join()
        self._raise()


class ResultSink:
    """The scheduler's hooks on every rank of the group; on the writer (stage 0, tp 0) they append each
    result, commit every ``every`` results or COMMIT_SECONDS (on ``Commits``' thread), count tokens
    and log progress."""

    def __init__(self, job: str, results: ResultLog, *, is_writer: bool, stage: int, every: int) -> None:
        self.job, self.results, self.is_writer, self.stage, self.every = job, results, is_writer, stage, every
        self.last_commit = time.monotonic()
        self.progress: RunProgress | None = None
        self.step_rates: list[float] = []  # output tokens a second of each decode step (the writer's)
        self._commits: Commits | None = None
        self._appended = self._requested = 0  # results appended; appended when a commit was last asked

    def start(self, total: int, done_before: int) -> None:
        self.progress = RunProgress(total, done_before, every=LOG_SECONDS)
        if self.is_writer:
            self._commits = Commits(self.commit)

    def commit(self, done: bool = False) -> None:
        t0 = time.monotonic()
        committed = self.results.commit(done=done)
        metrics.CHECKPOINT_SECONDS.labels(self.job).observe(time.monotonic() - t0)
        metrics.PROMPTS_COMPLETED.labels(self.job).inc(committed)
        metrics.LAST_CHECKPOINT_STEP.labels(self.job).set(self.results.completed)
        metrics.LAST_CHECKPOINT_TIME.labels(self.job).set(time.time())

    def finish(self) -> None:
        """The last commit (``done``), once the thread's are over."""
        if self._commits is not None:
            self._commits.close()
            self._commits = None
        self.commit(done=True)

    def on_result(self, r: Result) -> None:
        if not self.is_writer:
            return
        self.results.append(
            {"id": r.id, "output_ids": r.output_ids, "text": r.text, "finish_reason": r.finish_reason}
        )
        self._appended += 1
        now = time.monotonic()
        if self._appended - self._requested >= self.every or now - self.last_commit > COMMIT_SECONDS:
            self._requested, self.last_commit = self._appended, now
            if self._commits is not None:
                self._commits.request()
            else:
                self.commit()
        assert self.progress is not None
        line = self.progress.result(len(r.output_ids))
        if line is not None:
            log.info("progress", extra=line)

    def on_first_token(self, dt: float) -> None:
        if self.is_writer:  # one rank counts, so summing the job's endpoints counts each token once
            metrics.TIME_TO_FIRST_TOKEN.labels(self.job).observe(dt)
            metrics.TOKENS_GENERATED.labels(self.job).inc()

    def on_decode_step(self, dt: float, tokens: int) -> None:
        if self.is_writer:
            self.step_rates.append(tokens / max(dt, 1e-9))
            metrics.TOKEN_LATENCY.labels(self.job).observe(dt)
            PROGRESS.beat()  # the liveness probe's evidence of progress (watchdog.py)
            metrics.TOKENS_GENERATED.labels(self.job).inc(tokens)

    def on_wait(self, dt: float) -> None:
        metrics.BUBBLE_SECONDS.labels(self.job, str(self.stage)).inc(dt)

    def hooks(self) -> SchedulerHooks:
        return SchedulerHooks(self.on_result, self.on_first_token, self.on_decode_step, self.on_wait)


def run_rank(pod: PodEnv, local_rank: int, started: float | None = None) -> int:
    """``started``: the process's start (time.monotonic): start-up is timed from there."""
    spec = pod.spec
    assert spec.inference is not None and spec.model is not None
    clock = StartupClock(started)
    admission = admission_from_env()  # (a bad value is refused before anything starts)
    profile = profiling.requested()  # CONVEYOR_PROFILE_DIR: a profile of the generation
    info = init_distributed(device=spec.device)
    clock.lap("rendezvous")
    options = CompileOptions.from_env(info.device, compile_prompts=False)  # (decided below, by the input)
    prepare_compiler(options, pod.compile_cache_dir)  # reads nothing of the job: overlaps the checks
    clock.lap("compiler")
    wait_at_gate()  # nothing of the model or the input is read before the pre-flight checks pass
    clock.lap("preflight")
    topo = Topology(Layout(1, pod.stages, pod.tensor_parallel))
    job, inf = pod.job, spec.inference
    is_writer = topo.stage == 0 and topo.tp_rank == 0
    output = Path(inf.output)
    replicas = max(pod.replicas, 1)
    part_path = output if replicas == 1 else output.with_name(f"{output.name}.r{pod.replica}")
    results = ResultLog(part_path, job_identity(spec) if is_writer else None)
    from conveyor.inference.model.families import load_arch

    arch = load_arch(spec.model.path, pod.compile_cache_dir)
    tokenizer = load_tokenizer(spec.model.path, pod.compile_cache_dir) if topo.stage == 0 else None
    clock.lap("config")

    # Rank 0 decides what is left; everyone learns it (stage-0 ranks need the prompts, all need sizes).
    state: list[Any] = [pending_work(pod, results, output, tokenizer, arch) if info.rank == 0 else None]
    clock.lap("input")
    dist.broadcast_object_list(state, src=0)  # (the first collective: NCCL sets up its communicator)
    clock.lap("sync")
    if "error" in state[0]:  # every rank stops with rank 0's one-line cause (exit 2: bad input)
        destroy_distributed()
        raise InputError(state[0]["error"])
    todo = state[0]["requests"]
    if state[0]["done"]:
        log.info("job already complete; nothing to do", extra={"completed": state[0]["completed"]})
        if local_rank == 0:
            write_termination(True, state[0]["completed"])
        destroy_distributed()
        return 0

    micro_batches, lanes_per_micro_batch = micro_batch_layout(
        inf.batch_size, spec.parallelism.effective_micro_batches
    )
    prompt_tokens = sum(len(r.prompt_ids) for r in todo)
    options = CompileOptions.from_env(info.device, compile_prompts=compiling_prompts_pays(prompt_tokens))
    try:  # the cache holds the longest sequence (prompt and its own max_new_tokens)
        max_len = max(
            (cache_length(len(r.prompt_ids), r.max_new_tokens, arch.max_positions) for r in todo),
            default=cache_length(1, inf.max_new_tokens, arch.max_positions),
        )
    except PromptTooLongError as err:
        raise InputError(f"{inf.input}: {err}") from None
    rank = build_generation_rank(
        spec.model.path,
        topo,
        dtype=DTYPES[spec.model.dtype],
        device=info.device,
        micro_batches=micro_batches,
        lanes_per_micro_batch=lanes_per_micro_batch,
        max_len=max_len,
        options=options,
        cache_dir=pod.compile_cache_dir,
        quantization=inf.quantization,
        kv_cache_dtype=spec.model.kv_cache_dtype,
        on_phase=lambda name, seconds: metrics.WARMUP_SECONDS.labels(job, name).set(seconds),
    )
    for what in ("compiles", "captures"):
        metrics.COMPILES.labels(job, what, "warm_up").inc(rank.compiled.counts[what])
    clock.seconds.update(rank.seconds)
    metrics.READINESS.loaded()  # the pod's readiness probe (/ready) turns 200: loaded and warm
    sink = ResultSink(
        job,
        results,
        is_writer=is_writer,
        stage=topo.stage,
        every=spec.checkpoint.every if spec.checkpoint else 1,
    )
    total, done_before = len(todo) + state[0]["completed"], state[0]["completed"]
    sink.start(total, done_before)
    if is_writer:
        metrics.PROMPT_TOKENS.labels(job).inc(sum(len(r.prompt_ids) for r in todo))
    log.info(
        "inference starting",
        extra={
            "prompts": len(todo),
            "skipped": done_before,
            "micro_batches": micro_batches,
            "lanes": micro_batches * lanes_per_micro_batch,
            "startup_seconds": {k: round(v, 2) for k, v in clock.seconds.items()},
            "quantization": inf.quantization,
            "kv_cache_dtype": spec.model.kv_cache_dtype,
        },
    )
    if is_writer:
        results.open()
    name = f"{job}-r{pod.replica}-s{topo.stage}-rank{info.rank}"
    with profiling.profiled(profile, name):
        run_generation(
            rank.model,
            rank.peers,
            sampling_params(spec, arch.eos_token_ids),
            todo,
            micro_batches=micro_batches,
            lanes_per_micro_batch=lanes_per_micro_batch,
            device=info.device,
            tokenizer=tokenizer,
            hooks=sink.hooks(),
            admission=admission,  # free lanes gather before prompts join: fewer, fuller passes
        )
    rank.compiled.count_late_kernels()
    for what in ("compiles", "captures"):
        if late := rank.compiled.counts[f"late_{what}"]:
            metrics.COMPILES.labels(job, what, "late").inc(late)
    if info.device.type == "cuda":
        metrics.GPU_MEMORY_BYTES.labels(job, str(info.rank)).set(torch.cuda.memory_allocated())
    if is_writer:
        finish_output(sink, output, replicas, total)
    dist.barrier()  # why: no rank reports completion before the results are committed
    if local_rank == 0:
        write_termination(True, total)
    t0 = time.monotonic()
    if info.backend == "gloo":
        # gloo's group must go before the interpreter's teardown (distributed.py); NCCL's destroy took
        # 2 s on an H200 after every rank passed the barrier above, and the process exits next
        destroy_distributed()
    log.info("rank done", extra={"teardown_seconds": round(time.monotonic() - t0, 2)})
    return 0


def replica_parts(output: Path, replicas: int) -> list[ResultLog]:
    """The parts the replicas write, to read and merge (``<output>.r<r>``)."""
    return [ResultLog(output.with_name(f"{output.name}.r{r}")) for r in range(replicas)]


def finish_output(sink: ResultSink, output: Path, replicas: int, total: int) -> None:
    """The writer's last commit; with replicas, whoever finishes last merges the parts atomically."""
    sink.finish()
    sink.results.close()
    STOP_POINTS.reach(RESULTS_DONE)  # (tests only: a kill here)
    if replicas > 1 and merge_parts(replica_parts(output, replicas), output, by=sink.results):
        log.info("all replicas done; merged their outputs", extra={"output": str(output)})
    # The median step: decode alone, as generate.py's benchmark times it (a step whose turn also
    # prefilled joining prompts is slower, and rare: one a wave); the job's rate with prefills is the
    # progress lines' tokens_per_second.
    rates = sorted(sink.step_rates)
    decode = round(rates[len(rates) // 2], 1) if rates else None
    log.info(
        "inference complete",
        extra={"completed": sink.results.completed, "total": total, "decode_tokens_per_second": decode},
    )
