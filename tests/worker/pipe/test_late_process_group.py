"""A PipelineModule built before the process group existed knows one rank only: the engine refuses it
instead of training every process as a separate model."""

from __future__ import annotations

import conveyor
import pytest
from conveyor.distributed import destroy_distributed
from conveyor.pipe import PipelineModule
from conveyor.topology import LayoutError

from tests.worker.pipe.harness import run_ranks
from tests.worker.pipe.models import config, lm_loss, tied_layers


def _module_before_group(rank: int, world: int) -> str:
    destroy_distributed()  # as a script that leaves joining to conveyor.initialize (RANK, WORLD_SIZE set)
    net = PipelineModule(tied_layers(), num_stages=1, loss_fn=lm_loss)
    cfg = config(2, world)
    del cfg["train_batch_size"]  # micro-batch and accumulation only: nothing else would notice
    try:
        conveyor.initialize(model=net, config=cfg)
    except LayoutError as err:
        return str(err)
    return "initialized"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_module_built_before_the_process_group_is_refused(monkeypatch):
    # It was taken as 1 replica of 1 stage on each of the 2 ranks: no gradient was averaged and each
    # process trained its own model on its own data, silently
    monkeypatch.setenv("TEST_DIST_TIMEOUT", "30")
    for message in run_ranks(_module_before_group, 2):
        assert "PipelineModule was built for 1 rank" in message and "2 ranks" in message, message
        assert "conveyor.init_distributed()" in message, message
