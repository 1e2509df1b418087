import socket
from pathlib import Path

import pytest
from conveyor import utils


def test_a_picked_port_is_bindable_and_outside_the_kernels_ephemeral_range() -> None:
    ephemeral = utils._ephemeral_ports()
    ports = {utils.free_port() for _ in range(50)}
    assert not ports & set(ephemeral)
    assert len(ports) == 50  # never twice from one process, though the first is not bound yet
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_the_ephemeral_range_is_the_kernels() -> None:
    sysctl = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if sysctl.exists():
        low, high = (int(n) for n in sysctl.read_text().split())
        assert utils._ephemeral_ports() == range(low, high + 1)


def test_a_port_taken_by_a_listener_is_not_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        held = taken.getsockname()[1]
        draws = iter([held, held, held])
        monkeypatch.setattr(utils.random.SystemRandom, "randrange", lambda self, a, b: next(draws, held + 1))
        monkeypatch.setattr(utils, "_ephemeral_ports", lambda: range(0))
        assert utils.free_port() != held
