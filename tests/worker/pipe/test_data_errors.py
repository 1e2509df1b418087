"""A batch whose data cannot be read stops every stage at the batch's start, together: ranks that catch
the error can go on to a collective (an emergency checkpoint) instead of meeting peers left mid-batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import conveyor
import pytest
from conveyor.pipe import PipelineModule
from conveyor.pipe.engine import DataExhaustedError

from tests.worker.pipe.harness import run_ranks
from tests.worker.pipe.models import config, lm_loss, make_data, tied_layers


class BrokenDataset:
    """An iterator whose second item fails to load, as a dataset with a bad record does."""

    def __init__(self, items: list[Any]):
        self.items = iter(items)
        self.served = 0

    def __next__(self) -> Any:
        self.served += 1
        if self.served == 2:
            raise ValueError("record 1 is corrupt")
        return next(self.items)


def _train_then_save(rank: int, world: int, root: str, broken_rank: int, item: str) -> str:
    net = PipelineModule(tied_layers(), num_stages=2, loss_fn=lm_loss)
    engine, _, _, _ = conveyor.initialize(model=net, config=config(2, 1))
    data = make_data(1, 2)[0]
    if rank == broken_rank:
        source: Any = (
            BrokenDataset(data) if item == "raises" else iter([{"input_ids": ids} for ids, _ in data])
        )
    else:
        source = iter(data)
    try:
        engine.train_batch(source)
        outcome = "trained"
    except (DataExhaustedError, ValueError) as err:
        outcome = f"{type(err).__name__}: {err}"
    engine.save_checkpoint(Path(root))  # a collective: every rank must have left the batch alike
    return outcome


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("broken_rank", [0, 1])
@pytest.mark.parametrize("item", ["raises", "not a pair"])
def test_a_stage_whose_data_fails_stops_all_stages_at_the_batch_start(
    tmp_path, monkeypatch, broken_rank, item
):
    monkeypatch.setenv("TEST_DIST_TIMEOUT", "30")
    outcomes = run_ranks(_train_then_save, 2, str(tmp_path), broken_rank, item)
    own = "record 1 is corrupt" if item == "raises" else "must yield (inputs, labels) pairs"
    assert own in outcomes[broken_rank], outcomes
    assert "DataExhaustedError: a peer stage's data iterator failed" in outcomes[1 - broken_rank], outcomes
    assert (tmp_path / "step-0").is_dir()  # the emergency checkpoint was written by both ranks
