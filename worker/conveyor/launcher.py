"""``conveyor run JOB.yaml``: run a PipelineJob on this machine, no cluster needed.

Each pod the operator would create becomes a local ``conveyor worker`` process with the same
environment (``conveyor.env.pod_environ``), rendezvous on 127.0.0.1 with a free port per group. A bad
job, and a batch inference job's bad input, model, layout or output (inference/validate.py), are
refused in one line with exit code 2 before any process starts. When one pod fails, all are stopped,
the failed rank's one-line cause is printed once, and the group restarts as the operator would restart
it (``spec.restartPolicy``: the same backoff, CONVEYOR_RESTART raised) until ``backoffLimit`` is spent;
a refusal (exit 2) is not restarted, since it would only be refused again. Locally every pod restarts,
where the operator restarts only the failed replica's group; a replica that is done exits 0 at once.
Ctrl-C (or SIGTERM) stops the pods, keeps what they committed and exits 130 (143); a serve job whose
ranks all drained their requests and exited 0 exits 0. On a machine with a GPU for every rank, each pod
sees only its own GPUs (CUDA_VISIBLE_DEVICES), as the device plugin gives each pod its own in a cluster;
with fewer, the pods share them as before.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from conveyor.backoff import budget_left, restart_delay
from conveyor.env import pod_environ
from conveyor.failure import EXIT_REFUSED
from conveyor.log import configure, get_logger
from conveyor.preflight_gate import GATE_ENV
from conveyor.spec import Mode, PipelineJob, PipelineJobSpec, SpecError, load_job
from conveyor.supervise import Child, Gate, Outcome, run_group
from conveyor.utils import free_port

log = get_logger("conveyor.run")


def resolve_paths(spec: PipelineJobSpec, base: Path) -> PipelineJobSpec:
    """Relative paths in a job file are relative to that file (like kustomize), made absolute here."""

    def absolute(p: str) -> str:
        return str((base / p).resolve()) if not os.path.isabs(p) else p

    update: dict[str, object] = {}
    if spec.model is not None:
        update["model"] = spec.model.model_copy(update={"path": absolute(spec.model.path)})
    if spec.inference is not None:
        update["inference"] = spec.inference.model_copy(
            update={"input": absolute(spec.inference.input), "output": absolute(spec.inference.output)}
        )
    if spec.train is not None:
        paths = {k: getattr(spec.train, k) for k in ("script", "dataset", "export")}
        update["train"] = spec.train.model_copy(
            update={k: absolute(v) for k, v in paths.items() if v is not None}
        )
    if spec.checkpoint is not None:
        update["checkpoint"] = spec.checkpoint.model_copy(update={"path": absolute(spec.checkpoint.path)})
    return spec.model_copy(update=update)


def check_local(spec: PipelineJobSpec) -> None:
    """What a local run can check before starting anything (paths exist, device is present)."""
    problems = []
    if spec.model is not None and not Path(spec.model.path).is_dir():
        problems.append(f"spec.model.path: {spec.model.path} is not a directory; point it at a HF checkpoint")
    if spec.inference is not None and not Path(spec.inference.input).is_file():
        problems.append(
            f"spec.inference.input: {spec.inference.input} does not exist; give a JSONL file of prompts"
        )
    if spec.train is not None and spec.train.script and not Path(spec.train.script).is_file():
        problems.append(f"spec.train.script: {spec.train.script} does not exist")
    # the driver's device files, not torch.cuda: importing torch here cost every run 3 s
    if spec.device == "cuda" and not any(Path("/dev").glob("nvidia[0-9]*")):
        problems.append("spec.device: 'cuda' but this machine has no CUDA device; use device: cpu or auto")
    if problems:
        raise SpecError("\n".join(problems))


def local_gpus(environ: Mapping[str, str] | None = None, dev: Path = Path("/dev")) -> list[str]:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES names them: the caller's list if set, else the
    driver's device files (not torch.cuda: importing torch here cost every run 3 s)."""
    visible = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    # CUDA numbers the GPUs it sees from 0; a container's device files keep the host's numbers
    # (/dev/nvidia3 alone for the host's fourth GPU), so only their count says anything here.
    found = [p for p in dev.glob("nvidia[0-9]*") if p.name.removeprefix("nvidia").isdigit()]
    return [str(i) for i in range(len(found))]


def pod_gpus(spec: PipelineJobSpec, pod_number: int, gpus: list[str]) -> str | None:
    """The CUDA_VISIBLE_DEVICES of one local pod: its own ``gpus_per_pod`` GPUs when the machine has one
    for every pod's ranks, else None (the pods share them: without this, every stage's local rank 0
    was cuda:0)."""
    per_pod = spec.gpus_per_pod
    pods = spec.parallelism.replicas * spec.parallelism.stages
    if spec.device == "cpu" or per_pod == 0 or len(gpus) < per_pod * pods:
        return None
    return ",".join(gpus[pod_number * per_pod : (pod_number + 1) * per_pod])


def plan_pods(job: PipelineJob, spec: PipelineJobSpec, restart: int, workdir: Path) -> list[Child]:
    """One Child per pod: (replica, stage), with the pod environment the operator would set."""
    p = spec.parallelism
    train = spec.mode == Mode.TRAIN
    # Training replicas share one world; inference replicas are independent worlds (one port each).
    ports = [free_port()] * p.replicas if train else [free_port() for _ in range(p.replicas)]
    checkpoint_dir = spec.checkpoint.path if spec.checkpoint else None
    metrics_base = int(os.environ.get("CONVEYOR_METRICS_PORT", "0"))
    # A local run's endpoints are for this machine: the API has no authentication. A container that
    # publishes its port (docker run -p) needs CONVEYOR_LISTEN_HOST=0.0.0.0.
    listen_host = os.environ.get("CONVEYOR_LISTEN_HOST", "127.0.0.1")
    gpus = local_gpus()
    children = []
    for replica in range(p.replicas):
        for stage in range(p.stages):
            env = pod_environ(
                job=job.metadata.name,
                spec=spec,
                replica=replica,
                stage=stage,
                master_addr="127.0.0.1",
                master_port=ports[replica],
                restart=restart,
                checkpoint_dir=checkpoint_dir,
            )
            pod_number = replica * p.stages + stage
            env.update(
                CONVEYOR_LOG_PREFIX="1",
                CONVEYOR_LISTEN_HOST=listen_host,
                CONVEYOR_TERMINATION_LOG=str(workdir / f"termination-r{replica}-s{stage}.json"),
                # Local pods share one host: give each its own metrics ports (0 turns metrics off).
                CONVEYOR_METRICS_PORT=str(
                    metrics_base + pod_number * p.tensor_parallel if metrics_base else 0
                ),
            )
            visible = pod_gpus(spec, pod_number, gpus)
            if visible is not None:
                env["CUDA_VISIBLE_DEVICES"] = visible
            if spec.serve is not None:  # local replicas share one host: one endpoint port each
                env["CONVEYOR_SERVE_PORT"] = str(spec.serve.port + replica)
            children.append(
                Child(
                    name=f"replica {replica} stage {stage}",
                    argv=[sys.executable, "-m", "conveyor", "worker"],
                    env={
                        **os.environ,
                        "CONVEYOR_LOG_FORMAT": os.environ.get("CONVEYOR_LOG_FORMAT", "text"),
                        "CONVEYOR_PREFLIGHT_DONE": "1",  # run_job checked it; the workers need not again
                        **env,
                    },
                )
            )
    return children


def run_job(
    job: PipelineJob,
    restart: int = 0,
    grace_seconds: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    spec = job.spec
    check_local(spec)
    from conveyor.inference.validate import needs_preflight  # no torch: validate imports it lazily

    checks = _preflight(spec) if needs_preflight(spec) else None
    p, name, policy = spec.parallelism, job.metadata.name, spec.restart_policy
    log.info(
        f"running PipelineJob {name}: mode {spec.mode}, {p.replicas} replica(s) x "
        f"{p.stages} stage(s) x {p.tensor_parallel} tensor-parallel rank(s) = "
        f"{p.replicas * p.group_size} process(es)"
    )
    restarts, started = 0, time.monotonic()
    while True:
        # the first start's ranks wait at the gate while the checks run (preflight_gate.py)
        outcome, messages = run_once(job, restart + restarts, grace_seconds, checks if not restarts else None)
        if outcome.failed == "signal" and outcome.drained and spec.mode == Mode.SERVE:
            # a serve job's ranks drain their requests on SIGTERM and exit 0: a clean stop, not 143
            log.info(f"PipelineJob {name} stopped by a signal after draining its requests")
            return 0
        if outcome.failed == "signal":  # Ctrl-C or SIGTERM: a stop asked for, not a failure
            log.info(
                f"PipelineJob {name} stopped by a signal; committed progress is kept (run again to resume)"
            )
            return outcome.code
        if not outcome.code:
            summary = next(iter(messages.values()), {})
            log.info(
                f"PipelineJob {name} succeeded in {time.monotonic() - started:.1f}s",
                extra={"result": summary},
            )
            return 0
        failed = messages.get(outcome.failed or "", {})
        cause = failed.get("cause") or failed.get("message")
        log.error(
            f"PipelineJob {name} failed: {outcome.failed} exited with {outcome.code}"
            + (f": {cause}" if cause else "")
        )
        if outcome.code == EXIT_REFUSED:
            return outcome.code
        if not budget_left(policy, restarts):
            log.error(f"PipelineJob {name}: backoffLimit ({policy.backoff_limit}) restarts spent")
            return outcome.code
        delay = restart_delay(policy, restarts)
        restarts += 1
        log.warning(
            f"restarting PipelineJob {name} in {delay:.0f}s (restart {restarts} of {policy.backoff_limit}, "
            f"CONVEYOR_RESTART={restart + restarts})"
        )
        try:
            sleep(delay)
        except KeyboardInterrupt:
            log.info(f"PipelineJob {name} stopped during the restart backoff")
            return 130


def _preflight(spec: PipelineJobSpec) -> Callable[[], None]:
    def check() -> None:
        from conveyor.env import compile_cache_dir
        from conveyor.inference.validate import preflight

        started = time.monotonic()
        preflight(spec, cache_dir=compile_cache_dir())  # raises InputError: one line, exit 2
        log.info("pre-flight checks passed", extra={"seconds": round(time.monotonic() - started, 2)})

    return check


def run_once(
    job: PipelineJob, restart: int, grace_seconds: float, checks: Callable[[], None] | None = None
) -> tuple[Outcome, dict[str, dict[str, Any]]]:
    """One start of every pod; the outcome and each pod's termination message, by pod name. ``checks``
    run while the pods start, and the ranks wait for them to pass (preflight_gate.py)."""
    with tempfile.TemporaryDirectory(prefix="conveyor-run-") as tmp:
        workdir = Path(tmp)
        children = plan_pods(job, job.spec, restart, workdir)
        gate = None if checks is None else Gate(checks, workdir / "preflight-passed")
        if gate is not None:
            for child in children:
                child.env = {**child.env, GATE_ENV: str(gate.path)}
        outcome = run_group(children, grace_seconds=grace_seconds, gate=gate)
        messages = {}
        for child in children:
            path = Path(child.env["CONVEYOR_TERMINATION_LOG"])
            if path.is_file() and path.stat().st_size:
                messages[child.name] = json.loads(path.read_text())
    return outcome, messages


def main(args: argparse.Namespace) -> int:
    from conveyor.inference.validate import InputError  # no torch: validate imports it lazily

    configure(fmt=os.environ.get("CONVEYOR_LOG_FORMAT", "text"))
    try:
        if args.job is None:
            from conveyor.examples import default_job

            job = default_job(Path(args.workdir) if args.workdir else None)
            base = Path.cwd()
        else:
            path = Path(args.job)
            if not path.is_file():
                raise SpecError(f"{path}: no such file")
            job = load_job(path)
            base = path.resolve().parent
        job = job.model_copy(update={"spec": resolve_paths(job.spec, base)})
        code = run_job(job, restart=args.restart, grace_seconds=args.grace_seconds)
        if args.job is None and code == 0:
            from conveyor.examples import show_answers

            show_answers(job)
        return code
    except SpecError as err:
        where = args.job or "the built-in job"
        print(f"conveyor run: {where} is not a valid PipelineJob:\n{err}", file=sys.stderr)
        return 2
    except InputError as err:
        print(f"conveyor run: refused: {err}", file=sys.stderr)
        return EXIT_REFUSED
