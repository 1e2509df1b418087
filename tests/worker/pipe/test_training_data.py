"""initialize(training_data=): the engine's own loader gives every layout the same micro-batches."""

from __future__ import annotations

import conveyor
import pytest
from conveyor.pipe import PipelineModule

from tests.worker.pipe.harness import run_ranks
from tests.worker.pipe.models import config, lm_loss, make_data, tied_layers

STEPS = 3


def _samples() -> list:
    """5 samples: micro-batches of 2 leave one over at the end of every epoch."""
    return [(ids[0], labels[0]) for ids, labels in make_data(1, 5)[0]]


def _losses(rank: int = 0, world: int = 1) -> list[float]:
    net = PipelineModule(tied_layers(), num_stages=world, loss_fn=lm_loss)
    engine, _, _, _ = conveyor.initialize(model=net, config=config(2, 1), training_data=_samples())
    return [float(engine.train_batch()) for _ in range(STEPS)]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_an_epochs_partial_micro_batch_is_dropped_on_every_layout(monkeypatch):
    # The last, smaller micro-batch of an epoch trained in one process, and over two stages stopped the
    # run mid-schedule: a stage boundary carries one shape (BoundaryError "output changed")
    monkeypatch.setenv("TEST_DIST_TIMEOUT", "30")
    one_process = _losses()
    for losses in run_ranks(_losses, 2):
        assert losses == pytest.approx(one_process, rel=1e-5, abs=1e-5)
