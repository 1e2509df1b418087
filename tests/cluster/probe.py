"""Connections into a pod's network namespace, for the agent's readiness probes and for tests that act as
the cluster's service proxy (there is no kube-proxy: a test picks a Service's endpoint and connects to it).

A socket belongs to the network namespace of the thread that creates it, and stays there when that thread
ends: a short-lived thread enters the namespace with setns(2) and connects, the caller uses the socket.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import socket
import threading
from typing import Any

CLONE_NEWNET = 0x40000000


def connect(netns: str | None, host: str, port: int, timeout: float = 2.0) -> socket.socket:
    """A TCP connection to host:port made from inside network namespace ``netns`` (None: this one)."""
    if netns is None:
        return socket.create_connection((host, port), timeout=timeout)
    result: dict[str, Any] = {}

    def enter_and_connect() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns}")
            finally:
                os.close(fd)
            result["socket"] = socket.create_connection((host, port), timeout=timeout)
        except Exception as err:
            result["error"] = err

    thread = threading.Thread(target=enter_and_connect)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["socket"]


class _Connection(http.client.HTTPConnection):
    def __init__(self, sock: socket.socket, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.sock = sock

    def connect(self) -> None:  # the socket is connected already, in the right namespace
        pass


def request(
    netns: str | None,
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 2.0,
) -> tuple[int, bytes]:
    """One HTTP request through a connection made inside ``netns``; returns (status, body)."""
    sock = connect(netns, host, port, timeout)
    conn = _Connection(sock, host, port, timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
