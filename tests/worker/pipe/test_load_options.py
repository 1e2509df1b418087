"""``engine.load_checkpoint``'s DeepSpeed keywords: each restores what DeepSpeed's does, checked against the
state of the engine that saved and of a fresh one (one process; 2 stages on 2 gloo ranks); and
``save_checkpoint``'s DeepSpeed arguments."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import conveyor
import pytest
import torch
from conveyor.pipe import PipelineModule
from torch import nn

from tests.worker.pipe.harness import run_ranks
from tests.worker.pipe.models import config, lm_loss, make_data, tied_layers

STEPS = 3
OPTIONS: dict[str, dict[str, Any]] = {
    "everything": {},
    "module only": {"load_module_only": True},
    "no optimizer": {"load_optimizer_states": False},
    "no scheduler": {"load_lr_scheduler_states": False},
}
# what each restores of the saving engine's state; the rest stays as a fresh engine's
RESTORED = {
    "everything": {"weights", "optimizer", "scheduler", "step"},
    "module only": {"weights"},
    "no optimizer": {"weights", "scheduler", "step"},
    "no scheduler": {"weights", "optimizer", "step"},
}


def _engine(plain: bool, stages: int = 1) -> Any:
    cfg = {
        **config(2, 1),
        "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 0.05, "warmup_num_steps": 10}},
    }
    if plain:
        cfg.pop("pipeline")
        torch.manual_seed(0)
    net = (
        nn.Sequential(nn.Linear(4, 1))
        if plain
        else PipelineModule(tied_layers(), num_stages=stages, loss_fn=lm_loss)
    )
    return conveyor.initialize(model=net, config=cfg)[0]


def _train(engine: Any, plain: bool) -> None:
    data = make_data(STEPS, 2)
    for step in range(STEPS):
        if plain:
            for _ in range(2):
                engine.backward(engine(torch.full((2, 4), float(step + 1))).pow(2).mean())
                engine.step()
        else:
            engine.train_batch(iter(data[step]))


def _state(engine: Any) -> dict[str, Any]:
    return {
        "weights": {k: v.detach().clone() for k, v in engine.module.state_dict().items()},
        "optimizer": copy.deepcopy(engine.optimizer.state_dict()["state"]),
        "scheduler": engine.lr_scheduler.state_dict()["last_epoch"],
        "lr": engine.get_lr(),
        "step": (engine.global_steps, engine.global_samples),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return bool(a == b)


def _check_loads(plain: bool, ckpt: Path, stages: int = 1) -> dict[str, str]:
    """Save after STEPS steps, load into fresh engines with each option; what differs from expected."""
    saver = _engine(plain, stages)
    _train(saver, plain)
    saver.save_checkpoint(ckpt, client_state={"note": 7})
    saved, fresh = _state(saver), _state(_engine(plain, stages))
    assert not _same(saved["weights"], fresh["weights"]) and saved["scheduler"] != fresh["scheduler"]
    problems = {}
    for name, kwargs in OPTIONS.items():
        engine = _engine(plain, stages)
        path, client = engine.load_checkpoint(ckpt, **kwargs)
        got = _state(engine)
        wrong = [
            part
            for part in ("weights", "optimizer", "scheduler", "step")
            if not _same(got[part], saved[part] if part in RESTORED[name] else fresh[part])
        ]
        if got["lr"] != (saved if "scheduler" in RESTORED[name] else fresh)["lr"]:  # the schedule's rate
            wrong.append("lr")
        if path is None or client != {"note": 7}:
            wrong.append(f"returned {path}, {client}")
        if wrong:
            problems[name] = ", ".join(wrong)
    return problems


@pytest.mark.parametrize("plain", [False, True], ids=["pipeline", "data-parallel"])
def test_each_deepspeed_keyword_restores_what_deepspeeds_does(tmp_path, plain):
    assert _check_loads(plain, tmp_path / "ckpt") == {}


def _two_stages(rank: int, world: int, ckpt: str) -> dict[str, str]:
    return _check_loads(False, Path(ckpt), stages=2)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_each_keyword_on_two_stages(tmp_path):
    assert run_ranks(_two_stages, 2, str(tmp_path / "ckpt")) == [{}, {}]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"load_module_strict": False}, r"load_module_strict=False\) is not supported"),
        ({"custom_load_fn": lambda *a: None}, r"custom_load_fn=...\) is not supported"),
    ],
)
def test_keywords_it_cannot_honour_are_refused_by_name(tmp_path, kwargs, message):
    engine = _engine(False)
    engine.save_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=message):
        engine.load_checkpoint(tmp_path, **kwargs)
    with pytest.raises(TypeError, match="load_universal"):
        engine.load_checkpoint(tmp_path, load_universal=True)


@pytest.mark.parametrize("plain", [False, True], ids=["pipeline", "data-parallel"])
def test_save_checkpoint_takes_deepspeeds_positional_arguments(tmp_path, plain):
    """DeepSpeed's save_checkpoint(save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
    its save_latest=True, passed by position, was taken as keep=True and pruned all but the newest."""
    engine = _engine(plain)
    for tag in ("step-1", "step-2", "step-3"):
        engine.save_checkpoint(tmp_path, tag, {"tag": tag}, True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-1", "step-2", "step-3"]
    engine.save_checkpoint(tmp_path, "e", {"tag": "e"}, True, False)
    assert engine.load_checkpoint(tmp_path)[1] == {"tag": "e"}
    with pytest.raises(ValueError, match=r"save_checkpoint\(save_latest=False\) is not supported"):
        engine.save_checkpoint(tmp_path, "d", save_latest=False)
    with pytest.raises(
        ValueError, match=r"save_checkpoint\(exclude_frozen_parameters=True\) is not supported"
    ):
        engine.save_checkpoint(tmp_path, "d", exclude_frozen_parameters=True)
    for keep in (0, -1, True):  # 0 kept every checkpoint, -1 deleted the oldest only
        with pytest.raises(ValueError, match=rf"save_checkpoint keep={keep!r}: use a count >= 1"):
            engine.save_checkpoint(tmp_path, "d", keep=keep)
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.tmp").exists()
