"""``conveyor run JOB.yaml``: run a PipelineJob on this machine, no cluster needed.

Each pod the operator would create becomes a local ``conveyor worker`` process with the same
environment (``conveyor.env.pod_environ``), rendezvous on 127.0.0.1 with a free port per group. A bad
job is refused before any process starts; when one pod fails, all are stopped and the first failure's
exit code is returned.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from conveyor.env import pod_environ
from conveyor.log import configure, get_logger
from conveyor.spec import Mode, PipelineJob, PipelineJobSpec, SpecError, load_job
from conveyor.supervise import Child, run_group
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
    if spec.train is not None and spec.train.script is not None:
        update["train"] = spec.train.model_copy(update={"script": absolute(spec.train.script)})
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


def plan_pods(job: PipelineJob, spec: PipelineJobSpec, restart: int, workdir: Path) -> list[Child]:
    """One Child per pod: (replica, stage), with the pod environment the operator would set."""
    p = spec.parallelism
    train = spec.mode == Mode.TRAIN
    # Training replicas share one world; inference replicas are independent worlds (one port each).
    ports = [free_port()] * p.replicas if train else [free_port() for _ in range(p.replicas)]
    checkpoint_dir = spec.checkpoint.path if spec.checkpoint else None
    metrics_base = int(os.environ.get("CONVEYOR_METRICS_PORT", "0"))
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
                CONVEYOR_TERMINATION_LOG=str(workdir / f"termination-r{replica}-s{stage}.json"),
                # Local pods share one host: give each its own metrics ports (0 turns metrics off).
                CONVEYOR_METRICS_PORT=str(
                    metrics_base + pod_number * p.tensor_parallel if metrics_base else 0
                ),
            )
            if spec.serve is not None:  # local replicas share one host: one endpoint port each
                env["CONVEYOR_SERVE_PORT"] = str(spec.serve.port + replica)
            children.append(
                Child(
                    name=f"replica {replica} stage {stage}",
                    argv=[sys.executable, "-m", "conveyor", "worker"],
                    env={
                        **os.environ,
                        "CONVEYOR_LOG_FORMAT": os.environ.get("CONVEYOR_LOG_FORMAT", "text"),
                        **env,
                    },
                )
            )
    return children


def run_job(job: PipelineJob, restart: int = 0, grace_seconds: float = 10.0) -> int:
    spec = job.spec
    check_local(spec)
    with tempfile.TemporaryDirectory(prefix="conveyor-run-") as tmp:
        workdir = Path(tmp)
        children = plan_pods(job, spec, restart, workdir)
        p = spec.parallelism
        log.info(
            f"running PipelineJob {job.metadata.name}: mode {spec.mode}, {p.replicas} replica(s) x "
            f"{p.stages} stage(s) x {p.tensor_parallel} tensor-parallel rank(s) = "
            f"{p.replicas * p.group_size} process(es)"
        )
        started = time.monotonic()
        outcome = run_group(children, grace_seconds=grace_seconds)
        elapsed = time.monotonic() - started
        messages = [
            json.loads(f.read_text()) for f in sorted(workdir.glob("termination-*.json")) if f.stat().st_size
        ]
    if outcome.code:
        log.error(f"PipelineJob {job.metadata.name} failed: {outcome.failed} exited with {outcome.code}")
        return outcome.code
    summary = messages[0] if messages else {}
    log.info(f"PipelineJob {job.metadata.name} succeeded in {elapsed:.1f}s", extra={"result": summary})
    return 0


def main(args: argparse.Namespace) -> int:
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
        return run_job(job, restart=args.restart, grace_seconds=args.grace_seconds)
    except SpecError as err:
        where = args.job or "the built-in job"
        print(f"conveyor run: {where} is not a valid PipelineJob:\n{err}", file=sys.stderr)
        return 2
