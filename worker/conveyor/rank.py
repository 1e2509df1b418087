"""One rank process: ``python -m conveyor.rank LOCAL_RANK`` (started by ``conveyor worker``).

Sets up logging and metrics for this rank, then hands over to the mode's entry: the batch inference
job, a serve replica's rank (the OpenAI-compatible endpoint), or the user's DeepSpeed-style training script.
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conveyor import checkpoint_lock, metrics
from conveyor.env import EnvError, PodEnv
from conveyor.failure import CAUSE_ENV, EXIT_REFUSED, is_refusal, one_line, write_cause
from conveyor.log import configure, get_logger
from conveyor.spec import Mode
from conveyor.utils import die_with_parent, parent_death_signal, pid_alive
from conveyor.watchdog import PROGRESS, PROGRESS_FILE_ENV

STARTED = time.monotonic()  # torch and the engine are imported later, in main: start-up counts them
log = get_logger("conveyor.rank")


def train_environ(pod: PodEnv) -> dict[str, str]:
    """The job's training settings for a user's script or command (it is an entry point; it reads them).
    RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, as torchrun and
    DeepSpeed's launcher set them, are already in this process's environment (``conveyor worker``)."""
    train = pod.spec.train
    assert train is not None
    checkpoint_dir = pod.checkpoint_dir or (pod.spec.checkpoint.path if pod.spec.checkpoint else None)
    return {
        "CONVEYOR_TRAIN_CONFIG": json.dumps(train.config),
        "CONVEYOR_TRAIN_STEPS": str(train.steps or 0),
        "CONVEYOR_CHECKPOINT_DIR": checkpoint_dir or "",
        "CONVEYOR_CHECKPOINT_EVERY": str(pod.spec.checkpoint.every if pod.spec.checkpoint else 0),
        "CONVEYOR_CHECKPOINT_KEEP": str(pod.spec.checkpoint.keep if pod.spec.checkpoint else 0),
    }


def run_train_script(pod: PodEnv) -> int:
    """Run spec.train.script as ``__main__``, as ``deepspeed script.py`` would, with the job's settings
    in the environment."""
    train = pod.spec.train
    assert train is not None and train.script is not None
    script = Path(train.script)
    if not script.is_file():
        log.error("training script not found", extra={"field": "spec.train.script", "path": str(script)})
        return 2
    os.environ.update(train_environ(pod))
    sys.argv = [str(script), *train.args]
    sys.path.insert(0, str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


HANDOFF_PREFIX = "conveyor-child-"


def child_handoff_dir() -> tempfile.TemporaryDirectory[str]:
    """A new folder for a training command's hand-off files, named for this rank's pid. A rank stopped by
    a signal (its supervisor's SIGTERM) skips the folder's clean-up, so the folders of ranks no longer
    running are removed first: a machine that runs many jobs does not collect them."""
    for old in Path(tempfile.gettempdir()).glob(f"{HANDOFF_PREFIX}*-*"):
        pid = old.name.removeprefix(HANDOFF_PREFIX).partition("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{HANDOFF_PREFIX}{os.getpid()}-")


def run_train_command(pod: PodEnv) -> int:
    """Run spec.train.command (+ args) as this rank's program and return its exit code. It joins the
    process group itself (its own rendezvous): this rank counts as ready once the program runs."""
    train = pod.spec.train
    assert train is not None and train.command is not None
    argv = [*train.command, *train.args]
    metrics.READINESS.joined()
    with child_handoff_dir() as handoff:
        # The program's engine beats and writes its metrics here; this rank's liveness probe and
        # /metrics read them (watchdog.py, metrics.py).
        beat_file, metrics_file = Path(handoff) / "beats", Path(handoff) / "metrics"
        PROGRESS.watch(beat_file)
        metrics.CHILD_METRICS.watch(metrics_file)
        env = {
            **os.environ,
            **train_environ(pod),
            PROGRESS_FILE_ENV: str(beat_file),
            metrics.CHILD_METRICS_FILE_ENV: str(metrics_file),
            # the program's save_checkpoint would take the lock this rank holds for it, and be refused
            **checkpoint_lock.held_environ(),
        }
        try:
            child = subprocess.run(argv, env=env, preexec_fn=parent_death_signal)
        except OSError as err:  # not found, not executable: a restart would not help
            log.error(
                "training command cannot be run", extra={"field": "spec.train.command", "error": str(err)}
            )
            return EXIT_REFUSED
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


def main(argv: list[str]) -> int:
    """Run the rank; a failure leaves one cause for the supervisor (failure.py): a refusal exits 2
    without a traceback, anything else logs its traceback here and exits 1."""
    try:
        return _main(argv)
    except Exception as err:
        cause = one_line(err)
        write_cause(cause)
        if is_refusal(err):
            if not os.environ.get(CAUSE_ENV):  # no supervisor to say it: say it here, once
                print(f"conveyor rank: {cause}", file=sys.stderr)
            return EXIT_REFUSED
        log.exception("rank failed", extra={"cause": cause})
        return 1


def _main(argv: list[str]) -> int:
    die_with_parent()  # a rank never outlives its `conveyor worker`
    local_rank = int(argv[0]) if argv else int(os.environ.get("LOCAL_RANK", "0"))
    try:
        pod = PodEnv.from_environ()
    except EnvError as err:
        print(f"conveyor rank: {err}", file=sys.stderr)
        return 2
    rank = pod.global_rank(local_rank)
    configure(job=pod.job, replica=pod.replica, stage=pod.stage, rank=rank)
    port = int(os.environ.get("CONVEYOR_METRICS_PORT", pod.spec.metrics_port))
    if pod.mode in (Mode.INFERENCE, Mode.SERVE):
        metrics.READINESS.expect_model()  # ready once the shard is loaded, not at the rendezvous
    if pod.mode in (Mode.INFERENCE, Mode.TRAIN):  # an idle serve replica is not hung: no watchdog there
        hang = os.environ.get("CONVEYOR_HANG_TIMEOUT")
        stall = os.environ.get("CONVEYOR_TEST_STALL_AFTER_BEATS")  # test hook: progress stops after n beats
        # test hook: the rank deadlocks after n beats, in the group's first run only (the restart recovers)
        wedge = os.environ.get("CONVEYOR_TEST_WEDGE_AFTER_BEATS") if pod.restart == 0 else None
        PROGRESS.configure(
            float(hang) if hang else None, int(stall) if stall else None, int(wedge) if wedge else None
        )
    # every interface in a pod (probes and Prometheus come from outside); `conveyor run` sets loopback
    listen_host = os.environ.get("CONVEYOR_LISTEN_HOST", "")
    metrics.serve(port + local_rank if port else 0, host=listen_host)
    log.info("rank starting", extra={"local_rank": local_rank, "world_size": pod.world_size})
    if pod.mode == Mode.INFERENCE:
        from conveyor.inference.job import run_rank
        from conveyor.stop_points import STOP_POINTS

        STOP_POINTS.configure(os.environ.get("CONVEYOR_TEST_STOP_AT"))  # test hook: a kill at a named point

        return run_rank(pod, local_rank, started=STARTED)
    if pod.mode == Mode.SERVE:
        from conveyor.inference import serve

        assert pod.spec.serve is not None
        # `conveyor run` gives each local replica its own port; a pod serves on the spec's
        http_port = int(os.environ.get("CONVEYOR_SERVE_PORT", pod.spec.serve.port))
        timeout = float(os.environ.get("CONVEYOR_SERVE_TIMEOUT", serve.REQUEST_TIMEOUT_SECONDS))
        return serve.run_rank(pod, local_rank, port=http_port, host=listen_host or "0.0.0.0", timeout=timeout)
    assert pod.spec.train is not None
    checkpoint_dir = pod.checkpoint_dir or (pod.spec.checkpoint.path if pod.spec.checkpoint else None)
    if rank == 0 and checkpoint_dir:  # the committing rank: one run at a time in its directory
        checkpoint_lock.hold(checkpoint_dir, job=pod.job)
    if pod.spec.train.fine_tunes:
        from conveyor.train.finetune import run_rank as fine_tune_rank

        return fine_tune_rank(pod, local_rank, os.environ.get("CONVEYOR_TERMINATION_LOG"))
    if pod.spec.train.command is not None:
        return run_train_command(pod)
    return run_train_script(pod)


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown: torch's and its threads' finalizers held every rank for
    about 3 s after its work was done (measured after the last atexit handler). Everything a rank
    writes is committed (fsynced, closed) before ``main`` returns; only the log streams need flushing."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
