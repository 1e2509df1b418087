"""DeepSpeed's non-pipeline engine API on a plain model (conveyor.initialize with an nn.Module): the
tutorial loop (engine(x), engine.backward(loss), engine.step()) on 2 gloo ranks equals one process
training a deep copy on all ranks' micro-batches (losses and weights); the config comes as a file path
or config_params; load_checkpoint(dir) without a tag resumes from latest and continues the same curve."""

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


def test_one_process_without_a_process_group(tmp_path):
    import conveyor

    from tests.worker.pipe.data_parallel_ranks import CONFIG, dataset, make_model, tutorial_loop

    net = make_model()
    engine, optimizer, loader, scheduler = conveyor.initialize(
        model=net, model_parameters=net.parameters(), training_data=dataset(), config_params=CONFIG
    )
    assert type(engine).__name__ == "DataParallelEngine" and optimizer is engine.optimizer
    assert engine.train_batch_size() == 4 and engine.gradient_accumulation_steps() == 2
    losses = tutorial_loop(engine, loader, STEPS)
    assert losses == pytest.approx(reference(world=1)[0], rel=1e-5, abs=1e-6)
    assert engine.load_checkpoint(tmp_path / "none") == (None, None)
