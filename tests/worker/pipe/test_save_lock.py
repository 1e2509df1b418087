"""``engine.save_checkpoint`` outside ``conveyor worker`` takes the worker's lock on the directory
(checkpoint_lock.py): a second process saving there is refused in one line at its first save, on every
rank, instead of the two interleaving their ``step-N`` directories and ``latest``; the process (or the
``train.command`` child) of the run that holds it is never refused by it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conveyor import checkpoint_lock
from conveyor.commit_protocol import CheckpointError
from conveyor.env import pod_environ
from conveyor.spec import parse_spec
from conveyor.utils import free_port

from tests.conftest import conveyor_cmd, subprocess_env
from tests.worker.pipe.harness import run_ranks

# A user's own program: the engine of conveyor.initialize, saving into argv[1] as argv[2]; then, on a line
# from its stdin, once more (as argv[2] + "-again").
SAVER = textwrap.dedent(
    """
    import sys
    import conveyor
    from torch import nn
    config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    engine = conveyor.initialize(model=nn.Linear(2, 1), config=config)[0]
    engine.save_checkpoint(sys.argv[1], tag=sys.argv[2])
    print("saved", flush=True)
    if sys.stdin.readline():
        engine.save_checkpoint(sys.argv[1], tag=sys.argv[2] + "-again")
        print("saved again", flush=True)
    """
)


def _engine():
    import conveyor
    from torch import nn

    config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    return conveyor.initialize(model=nn.Linear(2, 1), config=config)[0]


def _saver(ckpt, tag: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(ckpt), tag],
        env=subprocess_env(OMP_NUM_THREADS="1"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "saved", proc.communicate()
    return proc


@pytest.mark.timeout(120)
def test_a_second_program_saving_into_the_directory_is_refused(tmp_path):
    # No lock outside `conveyor worker`: the second program's save committed its own checkpoint and
    # pointed `latest` at it, the first one's next save pointed it back
    ckpt = tmp_path / "ckpt"
    first = _saver(ckpt, "first")
    try:
        with pytest.raises(CheckpointError) as err:
            _engine().save_checkpoint(ckpt, tag="second")
        message = str(err.value)
        assert f"save_checkpoint save_dir {ckpt} is in use by another run (pid {first.pid} on " in message
        assert "holds conveyor.lock" in message and "save into a directory of this run's own" in message
        assert not (ckpt / "second").exists() and (ckpt / "latest").read_text().strip() == "first"
        assert first.stdin is not None and first.stdout is not None
        first.stdin.write("go\n")
        first.stdin.flush()
        assert first.stdout.readline().strip() == "saved again"  # the holder goes on saving
    finally:
        first.stdin.close()  # type: ignore[union-attr]
        first.wait(timeout=60)
    assert first.returncode == 0
    path = _engine().save_checkpoint(ckpt, tag="second")  # its holder ended: the lock went with it
    assert path == ckpt / "second" and (ckpt / "latest").read_text().strip() == "second"


def test_the_holding_process_saves_under_any_name_of_the_directory(tmp_path, monkeypatch):
    """The worker's own lock (taken at the rank's start) and the engine's are one: a save in that process
    (fine-tuning, a train.script) is not refused by it, the directory named relatively or through a link."""
    ckpt = tmp_path / "ckpt"
    checkpoint_lock.hold(ckpt, job="worker")
    (tmp_path / "link").symlink_to(ckpt, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    engine = _engine()
    engine.save_checkpoint("link", tag="a")
    engine.save_checkpoint(os.path.join("ckpt", "..", "ckpt"), tag="b")
    assert (ckpt / "latest").read_text().strip() == "b"
    assert "(job worker)" in (ckpt / "conveyor.lock").read_text()


def _refused_on_every_rank(rank: int, world: int, ckpt: str) -> str:
    try:
        _engine().save_checkpoint(ckpt)
    except CheckpointError as err:
        return str(err)
    return "saved"


@pytest.mark.timeout(120)
def test_every_rank_raises_the_refusal(tmp_path):
    """Only the committing rank takes the lock; the others hear of its refusal instead of waiting for it
    in DCP's collectives."""
    ckpt = tmp_path / "ckpt"
    holder = _saver(ckpt, "first")
    try:
        results = run_ranks(_refused_on_every_rank, 2, str(ckpt))
    finally:
        holder.kill()
        holder.wait()
    assert all(f"save_checkpoint save_dir {ckpt} is in use by another run" in r for r in results), results
    assert not (ckpt / "step-0").exists()


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_train_command_saves_under_its_ranks_lock(tmp_path):
    """`conveyor worker`'s rank 0 holds the directory's lock and runs spec.train.command in a child: the
    child's save_checkpoint is its run's, not refused by its own rank."""
    ckpt = tmp_path / "ckpt"
    spec = parse_spec(
        {
            "mode": "train",
            "device": "cpu",
            "checkpoint": {"path": str(ckpt)},
            "train": {
                "command": [sys.executable, "-c", SAVER],
                "args": [str(ckpt), "from-command"],
                "steps": 1,
            },
        }
    )
    env = pod_environ(
        job="cmd", spec=spec, replica=0, stage=0, master_addr="127.0.0.1", master_port=free_port()
    )
    pod = subprocess.run(
        conveyor_cmd("worker"),
        env=subprocess_env(**env, CONVEYOR_METRICS_PORT="0", OMP_NUM_THREADS="1"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert pod.returncode == 0, pod.stderr[-3000:]
    assert (ckpt / "latest").read_text().strip() == "from-command"
    assert "(job cmd)" in (ckpt / "conveyor.lock").read_text()  # the rank's lock, not the program's own
