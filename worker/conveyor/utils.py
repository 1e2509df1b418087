"""Small helpers: those that DeepSpeed scripts import from ``deepspeed.utils``, ``free_port`` and
``die_with_parent``."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a local rendezvous (MASTER_PORT) or server. Another process
    may take it before it is bound again: use it at once, for local runs and tests.

    The port is drawn outside the kernel's ephemeral range. A port from ``bind(0)`` comes from that
    range, which every outgoing connection and ``bind(0)`` on the machine draws from too: a gloo
    peer's socket took one between the pick and the serve endpoint's bind, and the job failed with
    "address already in use". Outside the range only another explicit pick can collide."""
    ephemeral = _ephemeral_ports()
    chooser = random.SystemRandom()
    for _ in range(64):
        port = chooser.randrange(_FIRST_PICKED_PORT, 65536)
        if port in ephemeral or port in _picked:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            _picked.add(port)  # not again from this process: the first may not be bound yet
            return port
    with socket.socket() as s:  # a machine whose whole range is ephemeral
        s.bind((host, 0))
        return int(s.getsockname()[1])


_FIRST_PICKED_PORT = 10000  # below are the registered services users most often run
_picked: set[int] = set()


def _ephemeral_ports() -> range:
    """The kernel's range for ports it hands out itself (Linux's sysctl; its default elsewhere)."""
    try:
        low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


PARENT_PID_ENV = "CONVEYOR_PARENT_PID"


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies. A rank runs in its own process group (so
    its supervisor can signal it and whatever it forks), which a SIGKILL of the supervisor (the OOM
    killer, a force-deleted pod outside a container runtime, a killed ``conveyor run``) does not reach:
    without this the rank would live on, holding its GPU and its port. The supervisor passes its pid in
    CONVEYOR_PARENT_PID: a parent that died before this call (imports take seconds) is caught too. Linux
    only; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    expected = int(os.environ.get(PARENT_PID_ENV) or os.getppid())
    parent_death_signal()
    if os.getppid() != expected:  # the parent died before the request took effect
        os._exit(128 + signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs (as any user) in this process's PID namespace."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def parent_death_signal() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; a no-op elsewhere). Also a
    ``preexec_fn`` for a program a rank starts (spec.train.command)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


class RepeatingLoader:
    """Iterate a data loader forever, restarting it when it ends (``train_batch`` pulls exactly
    ``gradient_accumulation_steps`` micro-batches per call, so an epoch boundary must not stop it)."""

    def __init__(self, loader: Iterable[Any]):
        self.loader = loader
        self.data_iter: Iterator[Any] = iter(loader)
        self.epoch = 0

    def __iter__(self) -> RepeatingLoader:
        return self

    def __next__(self) -> Any:
        try:
            return next(self.data_iter)
        except StopIteration:
            self.epoch += 1
            sampler = getattr(self.loader, "sampler", None)
            if sampler is not None and hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)  # a new shuffle each epoch under DistributedSampler
            self.data_iter = iter(self.loader)
            return next(self.data_iter)  # an empty loader ends here instead of looping forever
