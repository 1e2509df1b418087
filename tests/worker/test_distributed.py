import subprocess
import sys
import textwrap

import pytest
from conveyor.distributed import DistributedInitError, init_distributed
from conveyor.utils import free_port

from tests.conftest import subprocess_env


def test_missing_variables_are_named():
    with pytest.raises(DistributedInitError, match="MASTER_ADDR, MASTER_PORT"):
        init_distributed(environ={"RANK": "0", "WORLD_SIZE": "2"})


def test_inconsistent_rank_is_rejected():
    with pytest.raises(DistributedInitError, match=r"RANK=2 must be in \[0, WORLD_SIZE=2\)"):
        init_distributed(
            environ={"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
        )


_CHILD = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    from conveyor.distributed import init_distributed, DistributedInitError
    from conveyor.topology import Layout, Topology
    try:
        info = init_distributed(timeout_seconds={timeout})
    except DistributedInitError as err:
        print("TIMEOUT", err)
        raise SystemExit(3)
    topo = Topology(Layout(stages=2))
    t = torch.tensor([info.rank + 1.0])
    dist.all_reduce(t, group=topo.pipe_group)
    print("SUM", int(t.item()), "STAGE", topo.stage)
    """
)


@pytest.mark.integration
def test_two_ranks_rendezvous_and_reduce():
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD.format(timeout=60)],
            env=subprocess_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "SUM 3 STAGE 0" in outs[0] and "SUM 3 STAGE 1" in outs[1]


@pytest.mark.integration
def test_missing_peer_times_out_instead_of_hanging():
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD.format(timeout=3)],
        env=subprocess_env(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"127.0.0.1:{port}" in proc.stdout and "within 3s" in proc.stdout


def _start_rank(
    port: int, rank: int, generation: str, timeout: int, stderr: int | None = None
) -> subprocess.Popen:
    """One rank of _CHILD in rendezvous ``generation`` (CONVEYOR_RENDEZVOUS) on 127.0.0.1:``port``."""
    env = subprocess_env(
        RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        CONVEYOR_RENDEZVOUS=generation,
    )
    code = _CHILD.format(timeout=timeout)
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
    )


@pytest.mark.integration
def test_a_rank_of_an_earlier_generation_never_joins_the_new_one():
    """A pod recreated from the old template (restart 0) reaches the new rank 0 (restart 1) first: the
    new generation forms without it, and it only times out apart."""
    port = free_port()
    new_master = _start_rank(port, 0, "restart-1-abc", 60)
    stale = _start_rank(port, 1, "restart-0-abc", 8)
    stale_out = stale.communicate(timeout=120)[0]
    new_peer = _start_rank(port, 1, "restart-1-abc", 60)
    outs = [p.communicate(timeout=120)[0] for p in (new_master, new_peer)]
    assert stale.returncode == 3 and "(rendezvous restart-0-abc)" in stale_out, stale_out
    assert [new_master.returncode, new_peer.returncode] == [0, 0], outs
    assert "SUM 3 STAGE 0" in outs[0] and "SUM 3 STAGE 1" in outs[1]


@pytest.mark.integration
def test_a_rank_that_reaches_an_earlier_generations_rank_0_waits_for_its_own():
    """The other way round: the new rank 1 starts while the old rank 0 (its pod still terminating, at the
    address the new rank 0 will have) holds the port. It must not wait under the old store, which then goes
    away (an error the operator would count as another restart), but reconnect until its own rank 0 is up."""
    port = free_port()
    old_master = _start_rank(port, 0, "restart-0-abc", 90)
    try:
        new_peer = _start_rank(port, 1, "restart-1-abc", 90, stderr=subprocess.PIPE)
        assert new_peer.stderr is not None
        seen = ""
        while "is rendezvous restart-0-abc" not in seen:  # it reached the old store and said so
            line = new_peer.stderr.readline()
            assert line, f"the new rank ended without reaching the old store: {seen[-3000:]}"
            seen += line
    finally:
        old_master.kill()
        old_master.wait()
    new_master = _start_rank(port, 0, "restart-1-abc", 90)
    outs = [p.communicate(timeout=120)[0] for p in (new_master, new_peer)]
    assert [new_master.returncode, new_peer.returncode] == [0, 0], outs
    assert "SUM 3 STAGE 0" in outs[0] and "SUM 3 STAGE 1" in outs[1]
