"""save_checkpoint's tag: a name the commit protocol can publish, the same on every rank."""

from __future__ import annotations

from pathlib import Path

import conveyor
import pytest
from conveyor.pipe import PipelineModule

from tests.worker.pipe.harness import run_ranks
from tests.worker.pipe.models import config, lm_loss, make_data, tied_layers


def _engine(stages: int = 1):
    net = PipelineModule(tied_layers(), num_stages=stages, loss_fn=lm_loss)
    engine, _, _, _ = conveyor.initialize(model=net, config=config(2, 1))
    return engine


@pytest.mark.parametrize(
    "tag", ["latest", "latest.tmp", "step-2.tmp", "run/step-2", "..", ".", "conveyor.lock"]
)
def test_a_tag_the_commit_protocol_cannot_publish_is_refused(tmp_path, tag):
    # "latest" became a directory where the pointer file belongs: that save and every later save and
    # load of the directory failed (IsADirectoryError)
    engine = _engine()
    engine.train_batch(iter(make_data(1, 2)[0]))
    first = engine.save_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=rf"save_checkpoint tag {tag!r}: .*use a plain name"):
        engine.save_checkpoint(tmp_path, tag=tag)
    assert engine.load_checkpoint(tmp_path)[0] == first  # the directory is as it was


def _save_with_own_tag(rank: int, world: int, root: str) -> str:
    engine = _engine(stages=2)
    try:
        engine.save_checkpoint(Path(root), tag=f"mine-{rank}")  # e.g. a tag built from a rank's clock
    except ValueError as err:
        return str(err)
    return "saved"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_ranks_saving_under_different_tags_all_refuse(tmp_path):
    # Each rank wrote into its own directory and rank 0 committed its own, holding one stage's weights
    messages = run_ranks(_save_with_own_tag, 2, str(tmp_path))
    for message in messages:
        assert "differs between ranks" in message and "'mine-0'" in message and "'mine-1'" in message, message
    assert not list(tmp_path.iterdir())
