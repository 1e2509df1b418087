"""A stage whose neighbour disappears fails with the schedule grid and where each stage stopped,
instead of hanging."""

from __future__ import annotations

import conveyor
import pytest
import torch
import torch.distributed as dist
from conveyor.pipe import PipelineModule
from conveyor.pipe.engine import PipelineCommError

from tests.worker.pipe.harness import run_ranks
from tests.worker.pipe.models import config, lm_loss, make_data, tied_layers


def _rank_main(rank: int, world: int) -> str:
    net = PipelineModule(tied_layers(), num_stages=2, loss_fn=lm_loss)
    engine, _, _, _ = conveyor.initialize(model=net, config=config(4, 1))
    if rank == 1:
        # stage 1 takes part in the batch's start (the data check), then leaves without its sends/receives
        dist.all_reduce(torch.zeros(1), op=dist.ReduceOp.MAX)
        return "left"
    try:
        engine.train_batch(iter(make_data(1, 4)[0]))
    except PipelineCommError as err:
        return str(err)
    return "no error"


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_lost_neighbour_reports_the_grid(monkeypatch):
    monkeypatch.setenv("TEST_DIST_TIMEOUT", "30")
    message, _ = run_ranks(_rank_main, 2)
    assert "stage 0 failed at schedule step" in message, message
    assert "'>' marks where each stage was" in message and "step | stage 0" in message
    at_row = next(line for line in message.splitlines() if line.startswith("at   |"))
    assert "@" in at_row and "?" in at_row  # stage 0's step is known, the departed stage 1's is not
