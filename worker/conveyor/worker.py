"""``conveyor worker``: the pod entry point.

Reads the pod's CONVEYOR_* environment once, checks a batch inference job's input, model, layout and
output before any rank starts (inference/validate.py; a refusal is one line and exit 2), starts one
process per tensor-parallel rank (each runs ``conveyor.rank``), and stops them all when one fails,
exiting with the first failure's code, so that the operator sees one failed container and restarts
the whole group. The failed rank's one-line cause (failure.py) goes to the termination message.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conveyor.env import EnvError, PodEnv
from conveyor.failure import CAUSE_ENV, EXIT_REFUSED, read_cause
from conveyor.log import configure, get_logger
from conveyor.preflight_gate import GATE_ENV
from conveyor.spec import Mode
from conveyor.supervise import Child, Gate, run_group
from conveyor.utils import die_with_parent

GRACE_SECONDS = 10.0
SERVE_GRACE_SECONDS = 600.0  # the serve rank's request timeout (inference/serve.py REQUEST_TIMEOUT_SECONDS)

log = get_logger("conveyor.worker")


def grace_seconds(mode: Mode, environ: Mapping[str, str] = os.environ) -> float:
    """How long the ranks get after SIGTERM before SIGKILL. A serve rank drains: it finishes the requests
    in flight, which may take up to their timeout (the pod's grace period covers it, render.py); a batch
    or train rank has nothing to finish that a restart does not redo. ``CONVEYOR_GRACE_SECONDS`` wins."""
    if "CONVEYOR_GRACE_SECONDS" in environ:
        return float(environ["CONVEYOR_GRACE_SECONDS"])
    return SERVE_GRACE_SECONDS if mode == Mode.SERVE else GRACE_SECONDS


def main(args: argparse.Namespace | None = None) -> int:
    die_with_parent()  # under `conveyor run`: never outlive the launcher (in a pod the runtime reaps us)
    configure()
    try:
        pod = PodEnv.from_environ()
    except EnvError as err:
        print(f"conveyor worker: {err}", file=sys.stderr)
        # No PodEnv to read progress from, but the operator still gets the one-line cause (exit 2: FailJob).
        from conveyor.commit_protocol import write_termination_message

        write_termination_message(
            os.environ.get("CONVEYOR_TERMINATION_LOG"), False, None, str(err), cause=str(err)
        )
        return EXIT_REFUSED
    configure(job=pod.job, replica=pod.replica, stage=pod.stage)
    log.info(
        "worker starting",
        extra={
            "ranks": pod.tensor_parallel,
            "world_size": pod.world_size,
            "restart": pod.restart,
            "mode": pod.mode,
        },
    )
    prefix_logs = os.environ.get("CONVEYOR_LOG_PREFIX") == "1"
    with tempfile.TemporaryDirectory(prefix="conveyor-worker-") as causes:
        children = [
            Child(
                name=f"rank {pod.global_rank(local)}",
                argv=[sys.executable, "-m", "conveyor.rank", str(local)],
                env={**os.environ, **pod.rank_environ(local), CAUSE_ENV: f"{causes}/rank-{local}"},
                prefix=f"[r{pod.replica} s{pod.stage} rank {pod.global_rank(local)}] "
                if prefix_logs
                else None,
            )
            for local in range(pod.tensor_parallel)
        ]
        # the ranks start at once and wait at the gate while the checks run (preflight_gate.py)
        gate = Gate(lambda: check_preflight(pod), Path(causes) / "preflight-passed")
        for child in children if needs_preflight(pod) else ():
            child.env = {**child.env, GATE_ENV: str(gate.path)}
        try:
            outcome = run_group(
                children,
                grace_seconds=grace_seconds(pod.mode),
                gate=gate if needs_preflight(pod) else None,
            )
        except Refused as refusal:
            log.error(str(refusal))
            report_failure(pod, str(refusal), str(refusal))
            return EXIT_REFUSED
        failed = next((c for c in children if c.name == outcome.failed), None)
        cause = read_cause(failed.env[CAUSE_ENV]) if failed is not None else None
        hung = [
            c for c in (read_cause(child.env[CAUSE_ENV]) for child in children) if c and c.startswith("Hung:")
        ]
    if outcome.failed == "signal" and hung:  # the liveness probe found a rank without progress
        log.error("worker stopped: a rank hung", extra={"cause": hung[0]})
        report_failure(pod, hung[0], hung[0])
    elif outcome.failed == "signal" and outcome.drained and pod.mode == "serve":
        # a serve rank drains its requests on SIGTERM and exits 0: the pod stops cleanly too
        log.info("worker stopped by a signal after draining its requests")
        return 0
    elif outcome.failed == "signal":  # stopped (pod deleted, Ctrl-C): not a failure of ours
        log.info("worker stopped by a signal", extra={"exit_code": outcome.code})
        report_failure(pod, f"stopped by signal {outcome.code - 128}")
    elif outcome.code:
        message = f"{outcome.failed} exited with code {outcome.code}" + (f": {cause}" if cause else "")
        log.error(
            "worker failed", extra={"failed": outcome.failed, "exit_code": outcome.code, "cause": cause}
        )
        report_failure(pod, message, cause)
    else:
        log.info("worker finished")
    return outcome.code


class Refused(Exception):
    """The pre-flight checks' one-line refusal."""


def needs_preflight(pod: PodEnv) -> bool:
    """``conveyor run`` has made the checks already when it sets CONVEYOR_PREFLIGHT_DONE."""
    from conveyor.inference.validate import needs_preflight as spec_needs_preflight

    return spec_needs_preflight(pod.spec) and os.environ.get("CONVEYOR_PREFLIGHT_DONE") != "1"


def check_preflight(pod: PodEnv) -> None:
    """A batch inference, serve or fine-tuning job's checks before any rank reads the model or the input (all
    pods: the model and layout; an inference job's stage 0, which reads and writes them: the input and
    output too)."""
    from conveyor.inference.validate import InputError, preflight

    try:
        preflight(
            pod.spec, input_and_output=pod.stage == 0, cache_dir=pod.compile_cache_dir, replica=pod.replica
        )
    except InputError as err:
        raise Refused(str(err)) from None


def committed_progress(pod: PodEnv) -> dict[str, Any] | None:
    """The newest committed progress on the job's volumes, as a termination message's lastCheckpoint:
    train, the checkpoint ``latest`` names; inference, the committed results of this pod's replica."""
    from conveyor.commit_protocol import resume_point, rfc3339

    if pod.mode == Mode.TRAIN and pod.checkpoint_dir:
        from conveyor.skipped_checkpoints import with_skipped

        committed = resume_point(pod.checkpoint_dir)  # where the restart will resume
        return with_skipped(committed.as_status() if committed else None, pod.checkpoint_dir)
    inference = pod.spec.inference
    if pod.mode == Mode.INFERENCE and inference is not None:
        from conveyor.inference.progress import ResultLog

        output = Path(inference.output)
        if pod.replicas > 1:
            output = output.with_name(f"{output.name}.r{pod.replica}")
        log_ = ResultLog(output)
        if log_.record_path.is_file():
            return {"step": log_.completed, "time": rfc3339(log_.record_path.stat().st_mtime)}
    return None


def report_failure(pod: PodEnv, message: str, cause: str | None = None) -> None:
    """A failed pod's termination message: what failed, and what is committed (so the operator's
    restart says where the group resumes). Reading the volumes must never hide the failure."""
    from conveyor.commit_protocol import write_termination_message

    path = os.environ.get("CONVEYOR_TERMINATION_LOG")
    if not path:
        return
    try:
        progress = committed_progress(pod)
    except Exception as err:  # a broken volume: report the failure without progress
        log.warning("could not read the committed progress", extra={"error": str(err)})
        progress = None
    write_termination_message(path, False, progress, message, cause=cause)
