"""fp16 loss scaling against DeepSpeed's DynamicLossScaler (deepspeed/runtime/fp16/loss_scaler.py,
``update_scale``): each expected sequence below is worked out by hand from its rules, cited per step.

Rules (DeepSpeed's names): on an overflow, if ``delayed_shift == 1 or cur_hysteresis == 1`` the scale is
halved, not below ``min_scale`` (an overflow already *at* ``min_scale`` raises), else ``cur_hysteresis -= 1``;
either way ``last_overflow_iter = cur_iter``. On a good step, ``consecutive_hysteresis`` refills the
hysteresis; ``stable_interval = cur_iter - last_overflow_iter - 1`` (``last_overflow_iter`` starts at -1),
and when it is > 0 and a multiple of ``scale_window`` the scale doubles (refilling the hysteresis when not
consecutive). ``cur_iter += 1`` after every step.

A sequence lists the scale each step's loss is multiplied by (the scale before that step's update), then
the scale after the last step; "O" is an overflowing step (always skipped), "G" a good one.
"""

from __future__ import annotations

import pytest
from conveyor.pipe.config import PrecisionConfig
from conveyor.pipe.loss_scaler import LossScaleError, LossScaler


def _scaler(**keys) -> LossScaler:
    return LossScaler(PrecisionConfig.model_validate({"enabled": True, **keys}))


def _drive(scaler: LossScaler, pattern: str) -> list[float]:
    used = []
    for step in pattern:
        used.append(scaler.cur_scale)
        scaler.update(step == "O")
    return [*used, scaler.cur_scale]


def test_deepspeeds_defaults():
    s = _scaler().settings
    # DeepSpeed's fp16 defaults: loss_scale 0 (dynamic), 2**16, window 1000, hysteresis 2, not consecutive, min 1
    assert (s.loss_scale, s.initial_scale_power, s.loss_scale_window, s.hysteresis) == (0.0, 16, 1000, 2)
    assert (s.consecutive_hysteresis, s.min_loss_scale) == (False, 1.0)
    assert _scaler().cur_scale == 2.0**16


def test_hysteresis_1_halves_on_every_overflow_and_doubles_after_window_plus_one_good_steps():
    scaler = _scaler(initial_scale_power=4, loss_scale_window=2, hysteresis=1)
    # iter 0 G: stable 0 -> 16 | 1 G: stable 1 | 2 G: stable 2 % 2 == 0 -> 32 | 3 G: stable 3 |
    # 4 G: stable 4 -> 64 | 5 O: delayed_shift 1 -> 32, last 5 | 6 G: stable 0 | 7 G: stable 1 |
    # 8 G: stable 2 -> 64 | 9 O: -> 32, last 9 | 10 O: -> 16, last 10
    assert _drive(scaler, "GGGGGOGGGOO") == [16, 16, 16, 32, 32, 64, 32, 32, 32, 64, 32, 16]


def test_hysteresis_2_not_consecutive_a_good_step_does_not_refill_it():
    scaler = _scaler(initial_scale_power=4, loss_scale_window=2, hysteresis=2)
    # 0 O: hysteresis 2 -> 1, scale kept, last 0 | 1 G: not consecutive, stable 0: nothing |
    # 2 O: hysteresis 1 -> 8, last 2 | 3 G: stable 0 | 4 G: stable 1 | 5 G: stable 2 -> refill to 2, 16 |
    # 6 O: hysteresis 2 -> 1, last 6 | 7 O: hysteresis 1 -> 8
    assert _drive(scaler, "OGOGGGOO") == [16, 16, 16, 8, 8, 8, 16, 16, 8]


def test_hysteresis_2_consecutive_a_good_step_refills_it():
    scaler = _scaler(initial_scale_power=4, loss_scale_window=2, hysteresis=2, consecutive_hysteresis=True)
    # 0 O: 2 -> 1, last 0 | 1 G: refilled to 2, stable 0 | 2 O: 2 -> 1 (no halving), last 2 | 3 G: refill, stable 0 |
    # 4 G: stable 1 | 5 G: stable 2 -> 32 | 6 O: 2 -> 1, last 6 | 7 O: hysteresis 1 -> 16
    assert _drive(scaler, "OGOGGGOO") == [16, 16, 16, 16, 16, 16, 32, 32, 16]


def test_hysteresis_3_overflows_use_it_up_and_a_doubling_refills_it():
    scaler = _scaler(initial_scale_power=4, loss_scale_window=3, hysteresis=3)
    # 0 O: 3 -> 2, last 0 | 1 O: 2 -> 1, last 1 | 2..4 G: stable 0, 1, 2 | 5 G: stable 3 -> refill to 3, 32 |
    # 6 O: 3 -> 2 | 7 O: 2 -> 1 | 8 O: hysteresis 1 -> 16
    assert _drive(scaler, "OOGGGGOOO") == [16, 16, 16, 16, 16, 16, 32, 32, 32, 16]


def test_window_1_doubles_from_the_second_good_step_on():
    scaler = _scaler(initial_scale_power=4, loss_scale_window=1, hysteresis=1)
    # 0 G: stable 0 (> 0 fails) | 1 G: stable 1 -> 32 | 2 G: stable 2 -> 64
    assert _drive(scaler, "GGG") == [16, 16, 32, 64]


@pytest.mark.parametrize(
    ("keys", "before_the_error"),
    [
        # 0 O: 4 -> 2 | 1 O: 2 -> 1 (= min) | 2 O: at min_scale -> raise
        ({"initial_scale_power": 2, "hysteresis": 1}, [4, 2, 1]),
        # max(cur / 2, min_scale): 8 -> 4 -> max(2, 3) = 3, then an overflow at 3 raises
        ({"initial_scale_power": 3, "hysteresis": 1, "min_loss_scale": 3}, [8, 4, 3]),
        # 0 O: hysteresis 2 -> 1 | 1 O: 4 -> 2 | 2 O: still 1 (overflows never refill it): 2 -> 1 | 3 O: raise
        ({"initial_scale_power": 2, "hysteresis": 2}, [4, 4, 2, 1]),
    ],
)
def test_an_overflow_at_the_minimum_scale_stops_the_run(keys, before_the_error):
    scaler = _scaler(**keys)
    used = []
    with pytest.raises(LossScaleError, match="fp16.min_loss_scale"):
        for _ in range(len(before_the_error) + 1):
            used.append(scaler.cur_scale)
            scaler.update(True)
    assert used == before_the_error


def test_min_scale_is_a_floor_that_good_steps_climb_from():
    scaler = _scaler(initial_scale_power=1, loss_scale_window=1, hysteresis=1)
    # 0 O: 2 -> 1, last 0 | 1 G: stable 0 | 2 G: stable 1 -> 2 | 3 O: 2 -> 1 (not raised: 2 != min)
    assert _drive(scaler, "OGGO") == [2, 1, 1, 2, 1]


def test_a_fixed_loss_scale_never_moves():
    scaler = _scaler(loss_scale=128, hysteresis=1, loss_scale_window=1)
    # LossScaler (static): update_scale does nothing; overflowing steps are still skipped by the optimizer
    assert _drive(scaler, "OOOGGGO") == [128] * 8


@pytest.mark.parametrize("consecutive", [False, True])
def test_a_restored_scaler_continues_the_same_sequence(consecutive):
    keys = {
        "initial_scale_power": 4,
        "loss_scale_window": 2,
        "hysteresis": 2,
        "consecutive_hysteresis": consecutive,
    }
    pattern = "OGOGGGOOGGGGO"
    whole = _drive(_scaler(**keys), pattern)
    for cut in range(1, len(pattern)):
        first = _scaler(**keys)
        head = _drive(first, pattern[:cut])[:-1]
        resumed = _scaler(**keys)
        assert resumed.restore(first.state_dict()) == {}
        assert head + _drive(resumed, pattern[cut:]) == whole, f"resumed after step {cut}"


def test_a_restored_scaler_keeps_its_settings_and_names_those_the_config_changed():
    saved = _scaler(initial_scale_power=4, loss_scale_window=2, hysteresis=2)
    _drive(saved, "OGG")
    resumed = _scaler(initial_scale_power=4, loss_scale_window=5, hysteresis=2)
    # DeepSpeed's ZeRO optimizers load the pickled scaler object whole, its scale_window included
    assert resumed.restore(saved.state_dict()) == {"loss_scale_window": (2, 5)}
    assert resumed.settings.loss_scale_window == 2
    # 3 G: stable 2 (last overflow 0) -> 32 at the saved window of 2 (a window of 5 would keep 16)
    assert _drive(resumed, "G") == [16, 32]


def test_the_config_refuses_a_hysteresis_below_1():
    from conveyor.pipe.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="config.fp16.hysteresis"):
        load_config({"train_batch_size": 2, "fp16": {"enabled": True, "hysteresis": 0}})
