"""`conveyor run` and `conveyor worker`: the environment contract, failure handling, bad input."""

import json
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import conveyor_cmd, subprocess_env

# A training "script" that needs no torch: it records what the launcher gave it.
RECORD_ENV = textwrap.dedent(
    """
    import json, os, sys
    keys = [k for k in os.environ if k.startswith(("CONVEYOR_", "MASTER_")) or k in
            ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")]
    out = os.path.join(os.path.dirname(__file__), "rank-%s.json" % os.environ["RANK"])
    json.dump({"env": {k: os.environ[k] for k in keys}, "argv": sys.argv[1:]}, open(out, "w"))
    fail = os.environ.get("FAIL_RANK")
    if int(os.environ["CONVEYOR_RESTART"]) >= int(os.environ.get("FAIL_RESTARTS", "1000")):
        fail = None  # this restart succeeds
    if fail == os.environ["RANK"]:
        if os.environ.get("FAIL_RAISE"):
            raise RuntimeError("boom on rank " + fail)
        sys.exit(7)
    if fail is not None:
        import time
        time.sleep(600)  # the launcher must stop us
    """
)


def _write_job(path: Path, name: str, spec: dict) -> Path:
    """A PipelineJob document named ``name`` with ``spec``, as YAML at ``path``."""
    doc = {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "PipelineJob",
        "metadata": {"name": name},
        "spec": spec,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def _job(tmp: Path, restart_policy: dict | None = None, **parallelism) -> Path:
    (tmp / "record.py").write_text(RECORD_ENV)
    spec = {
        "restartPolicy": restart_policy or {"backoffLimit": 0},
        "mode": "train",
        "device": "cpu",
        "parallelism": parallelism,
        "checkpoint": {"path": "ckpt"},
        "train": {
            "script": "record.py",
            "args": ["--lr", "0.1"],
            "steps": 5,
            "config": {"train_batch_size": 4},
        },
    }
    return _write_job(tmp / "job.yaml", "envcheck", spec)


def _run(*args, env=None, timeout=120):
    return subprocess.run(
        conveyor_cmd(*args),
        env=subprocess_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_every_rank_gets_the_design_environment(tmp_path):
    job = _job(tmp_path, stages=2, tensorParallel=2, replicas=2)
    result = _run("run", str(job))
    assert result.returncode == 0, result.stdout + result.stderr
    records = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in tmp_path.glob("rank-*.json")}
    assert sorted(records) == list(range(8))  # 2 replicas x 2 stages x 2 TP, one world for training
    for rank, rec in records.items():
        env = rec["env"]
        replica, rem = divmod(rank, 4)
        stage, local = divmod(rem, 2)
        assert env["WORLD_SIZE"] == "8" and env["LOCAL_RANK"] == str(local)
        assert env["CONVEYOR_POD_INDEX"] == str(replica * 2 + stage)  # train: ordinal = replica * P + stage
        assert env["CONVEYOR_STAGES"] == "2" and env["CONVEYOR_TENSOR_PARALLEL"] == "2"
        assert env["CONVEYOR_MODE"] == "train" and env["CONVEYOR_JOB"] == "envcheck"
        assert env["CONVEYOR_CHECKPOINT_DIR"] == str(tmp_path / "ckpt")  # relative to the job file
        assert env["CONVEYOR_TRAIN_STEPS"] == "5"
        assert json.loads(env["CONVEYOR_TRAIN_CONFIG"]) == {"train_batch_size": 4}
        assert json.loads(env["CONVEYOR_SPEC"])["parallelism"]["tensorParallel"] == 2
        assert rec["argv"] == ["--lr", "0.1"]
    assert len({r["env"]["MASTER_PORT"] for r in records.values()}) == 1  # one world
    assert "[r1 s0 rank 5] " in result.stdout  # logs prefixed by rank in local runs


def test_first_failure_stops_every_rank_and_sets_the_exit_code(tmp_path):
    job = _job(tmp_path, stages=2, tensorParallel=2)
    started = time.monotonic()
    result = _run("run", str(job), "--grace-seconds", "2", env={"FAIL_RANK": "3"})
    assert result.returncode == 7, result.stdout + result.stderr
    assert time.monotonic() - started < 60  # the sleeping ranks were stopped, not waited for
    assert "failed" in result.stderr


def test_a_failed_rank_s_cause_is_printed_once(tmp_path):
    job = _job(tmp_path, stages=2, tensorParallel=2)
    result = _run("run", str(job), "--grace-seconds", "2", env={"FAIL_RANK": "2", "FAIL_RAISE": "1"})
    assert result.returncode == 1, result.stdout + result.stderr
    failures = [line for line in result.stderr.splitlines() if "PipelineJob envcheck failed" in line]
    assert len(failures) == 1, result.stderr
    assert failures[0].endswith("replica 0 stage 1 exited with 1: RuntimeError: boom on rank 2")
    assert (result.stdout + result.stderr).count("Traceback") == 1  # the failed rank's own, no other


def test_a_failed_group_restarts_as_the_operator_would(tmp_path):
    """restartPolicy locally: the group restarts after the backoff with CONVEYOR_RESTART raised, and the
    job fails once backoffLimit restarts are spent."""
    job = _job(tmp_path, {"backoffLimit": 2, "backoffSeconds": 1}, stages=2)
    result = _run("run", str(job), "--grace-seconds", "2", env={"FAIL_RANK": "1", "FAIL_RESTARTS": "2"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.count("restarting PipelineJob envcheck in") == 2
    assert "in 1s (restart 1 of 2, CONVEYOR_RESTART=1)" in result.stderr
    assert "in 2s (restart 2 of 2, CONVEYOR_RESTART=2)" in result.stderr  # backoff doubles
    assert json.loads((tmp_path / "rank-1.json").read_text())["env"]["CONVEYOR_RESTART"] == "2"

    spent = _run("run", str(job), "--grace-seconds", "2", env={"FAIL_RANK": "1", "FAIL_RESTARTS": "3"})
    assert spent.returncode == 7 and "backoffLimit (2) restarts spent" in spent.stderr


def test_ctrl_c_stops_the_job_with_130_and_no_failure(tmp_path):
    import signal

    job = _job(tmp_path, stages=2)
    proc = subprocess.Popen(
        conveyor_cmd("run", str(job), "--grace-seconds", "2"),
        env=subprocess_env(FAIL_RANK="9"),  # no rank fails: every rank sleeps until stopped
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("rank-*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "stopped by a signal" in err and "failed" not in err


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            {"mode": "inference", "model": {"path": "m"}},
            "spec.inference is required when spec.mode is 'inference'",
        ),
        (
            {"mode": "train", "train": {"script": "x.py"}, "checkpoint": {}, "parallelism": {"stages": 0}},
            "spec.parallelism.stages: Input should be greater than or equal to 1",
        ),
        (
            {"mode": "train", "train": {"script": "x.py"}, "checkpoint": {}, "parallelizm": {}},
            "spec.parallelizm: unknown field",
        ),
    ],
)
def test_bad_job_is_refused_before_any_process_starts(tmp_path, spec, message):
    path = _write_job(tmp_path / "bad.yaml", "bad", spec)
    result = _run("run", str(path))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_input_file_is_named(tmp_path):
    (tmp_path / "model").mkdir()
    spec = {
        "mode": "inference",
        "model": {"path": "model"},
        "inference": {"input": "nope.jsonl", "output": "out.jsonl"},
    }
    result = _run("run", str(_write_job(tmp_path / "job.yaml", "x", spec)))
    assert (
        result.returncode == 2 and "spec.inference.input" in result.stderr and "nope.jsonl" in result.stderr
    )


def test_worker_refuses_a_missing_environment():
    result = subprocess.run(
        conveyor_cmd("worker"),
        env=subprocess_env(CONVEYOR_SPEC=""),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "CONVEYOR_SPEC is not set" in result.stderr


def _spec(device: str = "cuda", **parallelism):
    from conveyor.spec import PipelineJobSpec

    return PipelineJobSpec.model_validate(
        {"mode": "inference", "device": device, "model": {"path": "m"}, "parallelism": parallelism,
         "inference": {"input": "in.jsonl", "output": "out.jsonl"}}
    )  # fmt: skip


def test_each_local_pod_sees_its_own_gpus_when_there_is_one_per_rank(tmp_path: Path) -> None:
    """Locally every stage's local rank 0 took cuda:0 (2 stages on a 2-GPU machine shared GPU 0): each
    pod now sees only its own GPUs, in the order of the caller's CUDA_VISIBLE_DEVICES."""
    from conveyor.launcher import local_gpus, pod_gpus

    gpus = local_gpus({"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert gpus == ["4", "5", "6", "7"]
    two_by_two = _spec(stages=2, tensorParallel=2)
    assert [pod_gpus(two_by_two, pod, gpus) for pod in range(2)] == ["4,5", "6,7"]
    assert [pod_gpus(_spec(stages=4), pod, gpus) for pod in range(4)] == ["4", "5", "6", "7"]
    # fewer GPUs than ranks, or the CPU: the pods share what there is, as before
    assert pod_gpus(_spec(stages=2, tensorParallel=4), 0, gpus) is None
    assert pod_gpus(_spec("cpu", stages=2), 0, gpus) is None
    assert local_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    # a container given the host's third and fourth GPUs: CUDA calls them 0 and 1
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia2", "nvidia3", "nvidiactl", "nvidia-uvm", "nvidia-caps"):
        (dev / name).touch()
    assert local_gpus({}, dev) == ["0", "1"]
