"""DeepSpeed's non-pipeline engine API on a plain model (conveyor.initialize with an nn.Module): the
tutorial loop (engine(x), engine.backward(loss), engine.step()) on 2 gloo ranks equals one process
training a deep copy on all ranks' micro-batches (losses and weights); the config comes as a file path
or config_params; load_checkpoint(dir) without a tag resumes from latest and continues the same curve; every optimizer step beats the liveness watchdog."""

from __future__ import annotations

import pytest
import torch

from tests.worker.pipe.data_parallel_ranks import STEPS, rank_main, reference
from tests.worker.pipe.harness import run_ranks


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_tutorial_loop_on_two_ranks_equals_one_process(tmp_path):
    ref_losses, ref_weights = reference(world=2)
    results = run_ranks(rank_main, 2, str(tmp_path))
    mean = [(a + b) / 2 for a, b in zip(results[0]["losses"], results[1]["losses"])]
    assert mean == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    for result in results:
        for name, value in result["weights"].items():
            torch.testing.assert_close(value, ref_weights[name], rtol=1e-5, atol=1e-6, msg=name)
        assert result["path"].endswith(f"step-{STEPS // 2}") and result["client"] == {"epoch": 1}
        assert result["resumed"] == pytest.approx(result["losses"][STEPS // 2 :], rel=1e-6, abs=1e-7)


def test_one_process_without_a_process_group(tmp_path, monkeypatch):
    import conveyor
    from conveyor import metrics
    from conveyor.watchdog import PROGRESS

    from tests.worker.pipe.data_parallel_ranks import CONFIG, dataset, make_model, tutorial_loop

    net = make_model()
    engine, optimizer, loader, scheduler = conveyor.initialize(
        model=net, model_parameters=net.parameters(), training_data=dataset(), config_params=CONFIG
    )
    assert type(engine).__name__ == "DataParallelEngine" and optimizer is engine.optimizer
    assert engine.train_batch_size() == 4 and engine.gradient_accumulation_steps() == 2
    exported = tmp_path / "metrics"  # as in a train.command program (metrics.CHILD_METRICS_FILE_ENV)
    monkeypatch.setattr(metrics, "_EXPORTER", metrics._Exporter(str(exported)))
    beats = PROGRESS.beats
    losses = tutorial_loop(engine, loader, STEPS)
    assert losses == pytest.approx(reference(world=1)[0], rel=1e-5, abs=1e-6)
    assert PROGRESS.beats - beats == STEPS  # each optimizer step is progress to the liveness probe
    assert "conveyor_train_step" in exported.read_text()  # for the rank's /metrics
    assert engine.load_checkpoint(tmp_path / "none") == (None, None)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_deepspeed_tutorial_script_runs_as_a_train_command(tmp_path):
    """The tutorial script, changed only in its import, run by `conveyor worker` pods through
    spec.train.command with --deepspeed --deepspeed_config: the one-process reference's losses."""
    import json
    import subprocess
    import sys

    from conveyor.env import pod_environ
    from conveyor.spec import parse_spec
    from conveyor.utils import free_port

    from tests.conftest import ROOT, conveyor_cmd, subprocess_env
    from tests.worker.pipe.data_parallel_ranks import CONFIG

    (tmp_path / "ds_config.json").write_text(json.dumps(CONFIG))
    script = ROOT / "tests" / "worker" / "pipe" / "deepspeed_tutorial.py"
    spec = parse_spec(
        {
            "mode": "train",
            "device": "cpu",
            "parallelism": {"stages": 1, "replicas": 2},
            "checkpoint": {"path": str(tmp_path / "ckpt")},
            "train": {
                "command": [sys.executable, str(script)],
                "args": [
                    "--deepspeed",
                    "--deepspeed_config",
                    str(tmp_path / "ds_config.json"),
                    "--out",
                    str(tmp_path / "out.json"),
                ],
            },
        }
    )
    port, procs = free_port(), []
    for replica in range(2):
        env = pod_environ(
            job="ds", spec=spec, replica=replica, stage=0, master_addr="127.0.0.1", master_port=port
        )
        procs.append(
            subprocess.Popen(
                conveyor_cmd("worker"),
                env=subprocess_env(**env, CONVEYOR_METRICS_PORT="0", OMP_NUM_THREADS="1"),
            )
        )
    assert [p.wait(timeout=200) for p in procs] == [0, 0]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["world"] == 2 and result["local_rank"] == 0
    assert result["losses"] == pytest.approx(reference(world=2)[0], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("saved_mid_batch", [False, True])
def test_a_resume_steps_after_a_whole_batch_of_the_new_accumulation(tmp_path, saved_mid_batch):
    """Saved at accumulation 4 (after 3 steps, or 1 micro-batch into the 4th), resumed at 8 (fewer ranks,
    the same train_batch_size; here a larger one): the saved micro-step count put the first boundary 4
    (or 3) micro-batches in, a step on part of a batch. DeepSpeed counts micro-steps afresh on resume."""
    import conveyor
    from torch import nn

    def engine(batch: int):
        torch.manual_seed(0)
        config = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": 2}
        config["optimizer"] = {"type": "SGD", "params": {"lr": 0.1}}
        return conveyor.initialize(model=nn.Linear(4, 1), config=config)[0]

    def micro_step(e) -> None:
        e.backward(e(torch.ones(2, 4)).pow(2).mean())
        e.step()

    saver = engine(8)
    for _ in range(3 * 4 + saved_mid_batch):
        micro_step(saver)
    saver.save_checkpoint(tmp_path)
    resumed = engine(16)
    resumed.load_checkpoint(tmp_path)
    steps = []
    for _ in range(16):
        micro_step(resumed)
        steps.append(resumed.global_steps)
    assert steps == [3] * 7 + [4] * 8 + [5]
