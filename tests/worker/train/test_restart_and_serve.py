"""Fine-tuning through the pod entry point (`conveyor worker` per pod, as the operator starts them):
killed (SIGKILL, every pod) after step 10, restarted, it resumes from its last checkpoint and continues
HF's loss curve to step 20, exports, and reports completion; then a batch inference job on the export
gives HF's greedy tokens for the exported model."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conveyor.env import pod_environ
from conveyor.spec import parse_spec
from conveyor.testing.tiny import save_tiny
from conveyor.utils import free_port

from tests.conftest import conveyor_cmd, subprocess_env
from tests.worker.train.reference import (
    STEPS,
    assert_output_is_the_exports_greedy_tokens,
    hf_train,
    spec_dict,
    write_dataset,
)

pytestmark = pytest.mark.integration


def start_pods(spec, tmp: Path, restart: int) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for stage in range(spec.parallelism.stages):
        env = pod_environ(
            job="ft",
            spec=spec,
            replica=0,
            stage=stage,
            master_addr="127.0.0.1",
            master_port=port,
            restart=restart,
        )
        full = subprocess_env(
            **env,
            OMP_NUM_THREADS="1",
            CONVEYOR_METRICS_PORT="0",
            CONVEYOR_DIST_TIMEOUT="120",
            CONVEYOR_TERMINATION_LOG=str(tmp / f"term-{restart}-s{stage}"),
        )
        procs.append(
            subprocess.Popen(
                conveyor_cmd("worker"), env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return procs


class Lines:
    """Collects a process's output lines in a thread (so that the test can watch for a step)."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line)

    def records(self, message: str) -> list[dict]:
        out = []
        for line in list(self.lines):
            if f'"{message}"' in line:
                out.append(json.loads(line[line.index("{") :]))
        return out


def losses(lines: Lines) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in lines.records("fine-tune step")}


@pytest.mark.timeout(900)
def test_killed_after_step_10_resumes_the_same_curve_then_inference_on_the_export(tmp_path):
    model = save_tiny("llama", tmp_path / "model")
    data = write_dataset(tmp_path / "data.jsonl")
    ref_losses, trained = hf_train(model, data)
    spec = parse_spec(spec_dict(model, data, tmp_path / "ckpt", stages=2, replicas=1))

    procs = start_pods(spec, tmp_path, restart=0)
    first = Lines(procs[0])
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and max(losses(first), default=0) < 10:
        assert all(p.poll() is None for p in procs), "".join(first.lines[-40:])
        time.sleep(0.02)
    for p in procs:
        p.kill()  # SIGKILL: the ranks die with their worker (die_with_parent)
        p.wait()
    first.thread.join(5)
    killed_at = max(losses(first))
    assert 10 <= killed_at < STEPS, killed_at
    assert not (tmp_path / "ckpt" / "export").exists()

    procs = start_pods(spec, tmp_path, restart=1)
    second = Lines(procs[0])
    for p in procs:
        assert p.wait(timeout=400) == 0, "".join(second.lines[-60:])
    second.thread.join(5)
    resumed = second.records("checkpoint loaded")[0]["step"]
    assert resumed in (5, 10), resumed  # the last committed checkpoint (every 5 steps)
    after = losses(second)
    assert sorted(after) == list(range(resumed + 1, STEPS + 1))
    before = losses(first)
    for step in range(1, STEPS + 1):
        got = after.get(step, before.get(step))
        assert got == pytest.approx(ref_losses[step - 1], rel=2e-4, abs=2e-4), step
    message = json.loads((tmp_path / "term-1-s0").read_text())
    assert message["completed"] is True and message["lastCheckpoint"]["step"] == STEPS

    # A batch inference job on the export: HF's greedy tokens of the trained model.

    export = tmp_path / "ckpt" / "export"
    prompts = [[5, 17, 99, 230], [41, 8, 77], [300, 12, 6, 90, 31]]
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": i, "input_ids": p}) + "\n" for i, p in enumerate(prompts))
    )
    job = parse_spec(
        {
            "mode": "inference",
            "device": "cpu",
            "model": {"path": str(export), "dtype": "float32"},
            "parallelism": {"stages": 2},
            "checkpoint": {"path": str(tmp_path / "infer-ckpt")},
            "inference": {
                "input": str(tmp_path / "in.jsonl"),
                "output": str(tmp_path / "out.jsonl"),
                "maxNewTokens": 6,
            },
        }
    )
    procs = start_pods(job, tmp_path, restart=0)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert_output_is_the_exports_greedy_tokens(tmp_path / "out.jsonl", export, trained, prompts)
