"""A checkpoint directory is one run's: a spec with another model, dataset or data order is refused on
resume (one line naming what differs), before it trains or reports the other run's export as its own;
the same spec resumes, extended too; a checkpoint saved before runs were recorded still resumes."""

from __future__ import annotations

import pytest
import torch
from conveyor.commit_protocol import CheckpointError
from conveyor.failure import is_refusal
from conveyor.spec import parse_spec
from conveyor.testing.tiny import save_tiny
from conveyor.topology import Layout, Topology
from conveyor.train.finetune import fine_tune

from tests.worker.train.reference import spec_dict, write_dataset


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    model = save_tiny("llama", root / "model", tokenizer=False)
    return model, write_dataset(root / "data.jsonl"), write_dataset(root / "other.jsonl", docs=30)


def run(ckpt, model, data, steps=2, **train):
    doc = spec_dict(model, data, ckpt, 1, 1, steps=steps)
    doc["checkpoint"]["every"] = 1
    doc["train"]["scheduler"] = None  # (its warm-up is longer than these runs)
    doc["train"].update(train)
    return fine_tune(parse_spec(doc), Topology(Layout()), torch.device("cpu"), ckpt, job="identity")


@pytest.mark.parametrize(
    "change,named",
    [
        ({"data": "other"}, "another dataset"),
        ({"seed": 8}, "seed 7"),
        ({"seqLength": 8}, "seqLength 16"),
        ({"globalBatchSize": 2}, "globalBatchSize 4"),
    ],
)
def test_another_runs_checkpoint_is_refused(files, tmp_path, change, named):
    model, data, other = files
    done = run(tmp_path, model, data)
    export = sorted(p.name for p in done.export.iterdir())
    change = dict(change)
    dataset = other if change.pop("data", None) else data
    with pytest.raises(CheckpointError, match=f"another run's \\(it was saved with {named}\\)") as err:
        run(tmp_path, model, dataset, **change)  # same steps: it used to report done with that export
    assert is_refusal(err.value)  # exit 2, no restart
    with pytest.raises(CheckpointError, match="another run's"):
        run(tmp_path, model, dataset, steps=4, **change)  # more steps: it used to train on from there
    assert sorted(p.name for p in done.export.iterdir()) == export
    assert (tmp_path / "latest").read_text().strip() == "step-2"


def test_another_model_of_the_same_shape_is_refused(files, tmp_path):
    model, data, _ = files
    run(tmp_path / "ck", model, data)
    other = save_tiny("llama", tmp_path / "other-model", tokenizer=False, seed=1)
    with pytest.raises(CheckpointError, match="another model"):
        run(tmp_path / "ck", other, data, steps=3)


def test_the_same_run_resumes_and_extends(files, tmp_path):
    model, data, _ = files
    run(tmp_path, model, data, steps=2)
    more = run(tmp_path, model, data, steps=3)
    assert more.resumed_from == 2 and list(more.losses) == [3]


def test_a_checkpoint_without_an_identity_still_resumes(files, tmp_path, monkeypatch):
    model, data, _ = files
    monkeypatch.setattr("conveyor.train.finetune.RUN_KEY", "not-recorded")  # as saved before
    run(tmp_path, model, data, steps=2)
    monkeypatch.undo()
    assert run(tmp_path, model, data, steps=3).resumed_from == 2


def test_an_extended_run_killed_before_its_export_exports_again(files, tmp_path, monkeypatch):
    # steps 2 -> export; extended to 3 and killed between its last checkpoint and the new export: the
    # restart found step 3 and an export directory (step 2's) and reported that export as the result
    from safetensors.torch import load_file

    model, data, _ = files
    run(tmp_path / "ck", model, data, steps=2)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # (as SIGKILL: nothing after the checkpoint runs)

    monkeypatch.setattr("conveyor.train.finetune.export", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "ck", model, data, steps=3)
    monkeypatch.undo()
    restarted = run(tmp_path / "ck", model, data, steps=3)
    assert restarted.resumed_from == 3 and restarted.losses == {}
    straight = run(tmp_path / "straight", model, data, steps=3)
    got, want = (
        load_file(restarted.export / "model.safetensors"),
        load_file(straight.export / "model.safetensors"),
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_an_extension_follows_its_own_schedule_and_says_so(files, tmp_path, caplog):
    # the schedule's saved state held total_num_steps (defaulted to the first run's steps) and torch's
    # load_state_dict put it back: the extension's steps ran at the final learning rate, near 0. DeepSpeed's
    # checkpoint holds only the schedule's position: the resumed run's total is its own steps
    import logging
    import math

    from tests.worker.train.reference import LR

    model, data, _ = files
    cosine = {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 1, "warmup_type": "linear"}}
    run(tmp_path, model, data, steps=3, scheduler=cosine)
    with caplog.at_level(logging.INFO):
        more = run(tmp_path, model, data, steps=5, scheduler=cosine)
    assert list(more.losses) == [4, 5]
    said = [r.getMessage() for r in caplog.records if "learning-rate schedule resumes" in r.getMessage()]
    assert len(said) == 1 and "total_num_steps 5 (saved: 3)" in said[0], said
    # the 4th step runs at DeepSpeed's iteration 2 (the first two at 0): past the warm-up of max(2, 1)
    # steps, the cosine (2 - 2 + 1) / (5 - 2) of its way down to cos_min_ratio 0.0001 (with the saved
    # total of 3, all the way: 0.0001)
    lr = next(r.lr for r in caplog.records if r.getMessage() == "fine-tune step" and r.step == 4)
    ratio = 0.0001 + 0.9999 * (1 + math.cos(math.pi / 3)) / 2
    assert lr == pytest.approx(LR * ratio, rel=1e-9)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_other_replicas_without_a_global_batch_name_it_and_the_fix(files, tmp_path):
    """Without spec.train.globalBatchSize the global batch is microBatchSize x replicas: a restart with
    other replicas is another run's data order. The refusal said only 'saved with globalBatchSize 2 ...
    restore that run's settings', which the spec never set."""
    from tests.worker.pipe.harness import run_ranks
    from tests.worker.train.ranks import fine_tune_rank

    model, data, _ = files
    doc = spec_dict(model, data, tmp_path, 1, 2, steps=2)
    doc["checkpoint"]["every"] = 1
    doc["train"].update(scheduler=None, globalBatchSize=None)
    run_ranks(fine_tune_rank, 2, doc, str(tmp_path), timeout=500)
    with pytest.raises(CheckpointError) as err:
        run(tmp_path, model, data, steps=3, globalBatchSize=None)
    message = str(err.value)
    assert "spec.train.globalBatchSize is not set" in message
    assert "microBatchSize x replicas (1 x 1 = 1)" in message
    assert "set spec.train.globalBatchSize: 2 to resume that run with 1 replica" in message
    # the fix it names resumes that run
    assert run(tmp_path, model, data, steps=3, globalBatchSize=2).resumed_from == 2


def test_a_global_batch_the_new_replicas_cannot_divide_is_named(files, tmp_path):
    from conveyor.train.run_identity import check

    model, data, _ = files
    doc = spec_dict(model, data, tmp_path, 1, 2, steps=2)
    doc["train"]["globalBatchSize"] = None
    spec = parse_spec(doc)
    settings = {"seqLength": 16, "globalBatchSize": 2}
    ours = {"model": "m", "dataset": "d", "settings": settings, "digest": "ours"}
    theirs = {**ours, "settings": {**settings, "globalBatchSize": 3}, "digest": "theirs"}
    with pytest.raises(CheckpointError) as err:
        check({"run": theirs}, ours, tmp_path / "step-2", spec)
    assert "that run's globalBatchSize 3 is not a multiple of microBatchSize x replicas (1 x 2 = 2)" in str(
        err.value
    )
