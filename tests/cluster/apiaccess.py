"""In-cluster API access for pods in their own network namespaces (what kube-proxy and the kubelet's
service-account volume give a real pod), so that an operator installed by the Helm chart can run as a pod.

- The `kubernetes` Service: the agent adds its ClusterIP (10.0.0.1) to the pod's loopback and listens on
  10.0.0.1:443 *inside* the pod's namespace (a socket is bound in the namespace of the thread that creates
  it; one short-lived thread enters the namespace with setns(2)), then forwards every connection, from the
  host's namespace, to the API server on 127.0.0.1. The API server's certificate already names 10.0.0.1.
- The service-account volume: a token from the TokenRequest API (bound to the pod), the cluster's CA and
  the namespace, in a directory that the pod's own mount namespace binds at
  /var/run/secrets/kubernetes.io/serviceaccount, the fixed path in-cluster clients read.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import threading
from pathlib import Path

from kubernetes import client

log = logging.getLogger("agent.api")
SERVICE_IP, SERVICE_PORT = "10.0.0.1", 443
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
CLONE_NEWNET = 0x40000000


def _listen_in_namespace(netns: str) -> socket.socket:
    """A listening socket on SERVICE_IP:SERVICE_PORT inside network namespace `netns`."""
    result: dict[str, object] = {}

    def enter_and_bind() -> None:
        # setns changes only this thread's namespace; the thread ends right after, the socket stays there.
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns}")
            finally:
                os.close(fd)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((SERVICE_IP, SERVICE_PORT))
            sock.listen(64)
            result["socket"] = sock
        except Exception as err:
            result["error"] = err

    thread = threading.Thread(target=enter_and_bind)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["socket"]  # type: ignore[return-value]


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class ServiceForwarder:
    """Forwards the pod namespace's 10.0.0.1:443 to the API server (started per pod, closed with it)."""

    def __init__(self, netns: str, api_host: str, api_port: int) -> None:
        self.listener = _listen_in_namespace(netns)
        self.api = (api_host, api_port)
        threading.Thread(target=self._accept, daemon=True, name=f"api-{netns}").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.api, timeout=10)
                upstream.settimeout(None)
            except OSError as err:
                log.warning("API server unreachable for a pod: %s", err)
                conn.close()
                continue
            threading.Thread(target=_pipe, args=(conn, upstream), daemon=True).start()
            threading.Thread(target=_pipe, args=(upstream, conn), daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


def write_service_account(api: client.CoreV1Api, pod: client.V1Pod, ca_pem: bytes, directory: Path) -> Path:
    """The files of a pod's service-account volume: token (bound to the pod), ca.crt and namespace."""
    ns, account = pod.metadata.namespace, pod.spec.service_account_name or "default"
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(
            audiences=[],  # the API server's own audience
            expiration_seconds=24 * 3600,
            bound_object_ref=client.V1BoundObjectReference(
                kind="Pod", api_version="v1", name=pod.metadata.name, uid=pod.metadata.uid
            ),
        )
    )
    token = api.create_namespaced_service_account_token(account, ns, request).status.token
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "token").write_text(token)
    (directory / "ca.crt").write_bytes(ca_pem)
    (directory / "namespace").write_text(ns)
    return directory
