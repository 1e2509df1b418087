import pytest
from conveyor.topology import Layout, LayoutError, Topology


def test_rank_layout_matches_design_contract():
    # rank = (replica * P + stage) * T + tp: a stage's T ranks adjacent, a replica's ranks contiguous.
    layout = Layout(replicas=2, stages=3, tensor_parallel=2)
    assert layout.world_size == 12
    for rank in range(12):
        c = layout.coord(rank)
        assert layout.rank(c.replica, c.stage, c.tp) == rank
    assert layout.coord(7).__dict__ == {"replica": 1, "stage": 0, "tp": 1}
    assert layout.pipe_groups()[0] == [0, 2, 4]
    assert layout.data_groups()[0] == [0, 6]
    assert layout.tensor_groups()[1] == [2, 3]
    assert layout.replica_groups() == [list(range(6)), list(range(6, 12))]
    # every rank is in exactly one group of each axis
    for groups in (layout.pipe_groups(), layout.data_groups(), layout.tensor_groups()):
        assert sorted(r for g in groups for r in g) == list(range(12))


def test_neighbours_without_process_group():
    topo = Topology(Layout(replicas=2, stages=3, tensor_parallel=2), rank=9, world_size=12)
    assert (topo.replica, topo.stage, topo.tp_rank) == (1, 1, 1)
    assert (topo.prev_rank, topo.next_rank) == (7, 11)
    assert not topo.is_first_stage and not topo.is_last_stage


def test_world_size_mismatch_is_a_clear_error():
    with pytest.raises(LayoutError, match="world size 6 != replicas 1 x stages 4"):
        Layout(stages=4).check_world(6)
    with pytest.raises(LayoutError, match="stages must be >= 1"):
        Layout(stages=0)
