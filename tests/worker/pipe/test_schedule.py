"""Schedules as data: every (stages, micro-batches) combination validated offline, no process group."""

import pytest
from conveyor.pipe.schedule import (
    Action,
    Kind,
    ScheduleError,
    add_communication,
    build_schedule,
    compute_order,
    format_grid,
    peak_in_flight,
    simulate,
    validate,
)

GRID = [(p, m) for p in range(1, 7) for m in range(1, 13)]


@pytest.mark.parametrize("name", ["1f1b", "gpipe", "forward"])
@pytest.mark.parametrize("stages,micro_batches", GRID)
def test_every_combination_is_valid_and_finishes(name, stages, micro_batches):
    schedule = build_schedule(name, stages, micro_batches)
    assert len(schedule) == stages
    assert all(pos is None for pos in simulate(schedule).values())


def test_1f1b_order_of_one_stage():
    order = [str(a) for a in compute_order("1f1b", 4, 6, 1)]
    # stage 1 of 4 runs 2 forwards ahead, then alternates, then drains
    assert order == ["1F0", "1F1", "1F2", "1B0", "1F3", "1B1", "1F4", "1B2", "1F5", "1B3", "1B4", "1B5"]


def test_1f1b_merges_send_forward_with_receive_backward():
    schedule = build_schedule("1f1b", 2, 3)
    steps = ["+".join(str(a) for a in step) for step in schedule[0]]
    assert "0SF1+0RB0" in steps  # the pairing that keeps rendezvous sends from deadlocking
    last = ["+".join(str(a) for a in step) for step in schedule[1]]
    assert "1SB0+1RF1" in last


@pytest.mark.parametrize("stages,micro_batches", [(2, 2), (4, 4), (4, 16), (3, 5)])
def test_1f1b_bounds_live_activations_gpipe_does_not(stages, micro_batches):
    assert peak_in_flight(build_schedule("1f1b", stages, micro_batches)) == [
        min(stages - s, micro_batches) for s in range(stages)
    ]
    assert peak_in_flight(build_schedule("gpipe", stages, micro_batches)) == [micro_batches] * stages


def test_unpaired_sends_deadlock_and_the_grid_marks_where():
    # Both stages post their send alone before their receive: with rendezvous sends nobody moves.
    s0 = [(Action(0, Kind.FORWARD, 0),), (Action(0, Kind.SEND_F, 0),), (Action(0, Kind.RECV_B, 0),)]
    s1 = [(Action(1, Kind.SEND_B, 9),), (Action(1, Kind.RECV_F, 0),)]
    positions = simulate([s0, s1])
    assert positions == {0: 1, 1: 0}
    grid = format_grid([s0, s1], positions)
    assert ">0SF0" in grid and ">1SB9" in grid and "@1" in grid


def test_validator_rejects_mismatched_order():
    compute = [compute_order("gpipe", 2, 2, s) for s in range(2)]
    schedule = add_communication(compute, 2)
    # swap the receive order on stage 1: its receives no longer meet stage 0's sends in order
    steps = schedule[1]
    i = [k for k, step in enumerate(steps) if step[0].kind == Kind.RECV_F]
    steps[i[0]], steps[i[1]] = (Action(1, Kind.RECV_F, 1),), (Action(1, Kind.RECV_F, 0),)
    with pytest.raises(ScheduleError, match=r"sends \[0, 1\] do not meet receives \[1, 0\]"):
        validate(schedule, 2)


def test_validator_rejects_backward_before_forward_and_missing_work():
    bad = [[(Action(0, Kind.BACKWARD, 0),), (Action(0, Kind.FORWARD, 0),)]]
    with pytest.raises(ScheduleError, match="0B0 before 0F0"):
        validate(bad, 1)
    with pytest.raises(ScheduleError, match="never runs 0B1, 0F1"):
        validate([[(Action(0, Kind.FORWARD, 0),), (Action(0, Kind.BACKWARD, 0),)]], 2)


def test_unknown_schedule_is_named():
    with pytest.raises(ScheduleError, match="unknown pipeline schedule 'zb'"):
        build_schedule("zb", 2, 2)
