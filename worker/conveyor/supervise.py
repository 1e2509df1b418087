"""Run a set of child processes as one unit: if one fails, stop the rest and report the first failure.

Used twice with the same semantics: ``conveyor worker`` supervises the T rank processes of a pod, and
``conveyor run`` supervises the pods of a local job. Children start in their own process groups so
that stopping one also stops whatever it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from conveyor.preflight_gate import open_gate
from conveyor.utils import PARENT_PID_ENV


@dataclass
class Child:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    prefix: str | None = None  # prefix each output line (local runs); None: inherit stdout/stderr
    stdout: int | None = None  # without a prefix: None inherits stdout; subprocess.DEVNULL drops it
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _pump: threading.Thread | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Gate:
    """Checks run while the children start; they wait at ``path`` (preflight_gate.GATE_ENV in their
    environment) until the checks pass."""

    check: Callable[[], None]
    path: Path


@dataclass(frozen=True)
class Outcome:
    code: int  # 0, or the exit code of the first child that failed (128 + signal for a signal)
    failed: str | None  # the name of that child
    drained: bool = False  # stopped by a signal, and every child then exited 0 (finished its work)


def _pump_lines(stream: IO[bytes], prefix: str, sink: IO[bytes]) -> None:
    for line in iter(stream.readline, b""):
        sink.write(prefix.encode() + line)
        sink.flush()
    stream.close()


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class Group:
    def __init__(self, children: Sequence[Child], grace_seconds: float = 10.0):
        self.children = list(children)
        self.grace_seconds = grace_seconds
        self._stopping = False

    def start(self) -> None:
        import sys

        for child in self.children:
            piped = child.prefix is not None
            child.proc = subprocess.Popen(
                list(child.argv),
                env={**child.env, PARENT_PID_ENV: str(os.getpid())},  # see utils.die_with_parent
                stdout=subprocess.PIPE if piped else child.stdout,
                stderr=subprocess.STDOUT if piped else None,
                start_new_session=True,
            )
            if piped:
                assert child.proc.stdout is not None and child.prefix is not None
                child._pump = threading.Thread(
                    target=_pump_lines, args=(child.proc.stdout, child.prefix, sys.stdout.buffer), daemon=True
                )
                child._pump.start()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM every live child's process group, then SIGKILL after the grace period."""
        self._stopping = True
        live = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for proc in live:
            _signal_group(proc, sig)
        deadline = time.monotonic() + self.grace_seconds
        for proc in live:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()

    def wait(self, poll_seconds: float = 0.02) -> Outcome:
        """Block until every child exited 0, or one failed (then stop the others). Polled: at 0.2 s, the
        worker's wait for its ranks and conveyor run's for the worker added 0.2-0.4 s to every job's end
        (a batch job of 14 s on an H200)."""
        pending = {id(c): c for c in self.children}
        while pending:
            for key, child in list(pending.items()):
                assert child.proc is not None
                code = child.proc.poll()
                if code is None:
                    continue
                del pending[key]
                if code != 0:
                    self.stop()
                    self._join_pumps()
                    return Outcome(_exit_code(code), child.name)
            time.sleep(poll_seconds)
        self._join_pumps()
        return Outcome(0, None)

    def _join_pumps(self) -> None:
        for child in self.children:
            if child._pump is not None:
                child._pump.join(timeout=5)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def run_group(children: Sequence[Child], grace_seconds: float = 10.0, gate: Gate | None = None) -> Outcome:
    """Start children, forward SIGTERM/SIGINT to them, and wait (see Group.wait). With a ``gate``, its
    check runs while the children start (see preflight_gate.py): passed, the gate opens; raised, the
    children are stopped and the check's exception is raised here once they have exited."""
    group = Group(children, grace_seconds)
    received: list[int] = []
    refused: list[BaseException] = []

    def _check(gate: Gate) -> None:
        try:
            gate.check()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread below
            refused.append(err)
            group.stop()
        else:
            open_gate(gate.path)

    def _forward(signum: int, _frame: object) -> None:
        received.append(signum)
        threading.Thread(target=group.stop, daemon=True).start()

    previous = {s: signal.signal(s, _forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        group.start()
        checking = None if gate is None else threading.Thread(target=_check, args=(gate,), daemon=True)
        if checking:
            checking.start()
        outcome = group.wait()
        if checking:
            checking.join()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if refused:
        raise refused[0]
    if received:  # the children's own exits (143 after our SIGTERM) are the stop we asked for
        return Outcome(128 + received[0], "signal", drained=outcome.code == 0)
    return outcome
