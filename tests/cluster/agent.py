"""A small stand-in for a node's kubelet (and the scheduler), for tests on the local control plane.

    python -m tests.cluster.agent --kubeconfig K [--node conveyor-local] --state-dir DIR --checkout ROOT

It registers a Ready Node (with cpu, memory and `nvidia.com/gpu` capacity, so GPU requests still fit), binds
every pending pod to it, runs each bound pod's containers as local processes (podrun.py, podspec.py) in their
own network namespace (network.py), writes the pods' status back, and on deletion stops their processes
(SIGTERM, SIGKILL after the grace period) and removes the pod object. Logs of every container run go to
DIR/pods/{namespace}_{pod}_{uid}/{container}/{restart}.log. It is test infrastructure, not product.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from tests.cluster.network import make_network
from tests.cluster.podrun import PodRunner, now

DEFAULT_SCHEDULER = "default-scheduler"
log = logging.getLogger("agent")
NODE_CAPACITY = {
    "cpu": "32",
    "memory": "128Gi",
    "pods": "110",
    "nvidia.com/gpu": "8",
    "ephemeral-storage": "100Gi",
}


def pod_log_dir(state_dir: Path, namespace: str, pod: str) -> list[Path]:
    """The log directories of every incarnation (uid) of `pod`, oldest first."""
    return sorted((state_dir / "pods").glob(f"{namespace}_{pod}_*"), key=lambda p: p.stat().st_mtime)


class Agent:
    def __init__(
        self, api: client.CoreV1Api, node: str, state_dir: Path, checkout: Path, python: str, network: str
    ):
        self.api, self.node = api, node
        self.state_dir, self.checkout, self.python = state_dir, checkout, python
        state_dir.mkdir(parents=True, exist_ok=True)
        self.network = make_network(state_dir, network)
        configuration = api.api_client.configuration
        url = urllib.parse.urlsplit(configuration.host)
        self.api_address = (url.hostname or "127.0.0.1", url.port or 443)  # for pods' in-cluster access
        self.ca_pem = Path(configuration.ssl_ca_cert).read_bytes() if configuration.ssl_ca_cert else b""
        self.runners: dict[str, PodRunner] = {}  # pod uid -> runner
        self.deleting: set[str] = set()
        self.stopping = threading.Event()
        self._lock = threading.Lock()

    # -- node -------------------------------------------------------------------------------------------
    def register_node(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node,
                "labels": {"kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux"},
            },
        }
        try:
            self.api.create_node(body)
        except ApiException as err:
            if err.status != 409:
                raise
        self.heartbeat()

    def heartbeat(self) -> None:
        stamp = now()
        status = {
            "capacity": NODE_CAPACITY,
            "allocatable": NODE_CAPACITY,
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node},
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "LocalAgentReady",
                    "message": "conveyor local agent runs pods as processes",
                    "lastHeartbeatTime": stamp,
                    "lastTransitionTime": stamp,
                }
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "conveyor-agent",
                "containerRuntimeVersion": "local-process://",
                "kubeProxyVersion": "",
                "osImage": "local",
                "kernelVersion": "",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },  # fmt: skip
        }
        self.api.patch_node_status(self.node, {"status": status})

    # -- pods -------------------------------------------------------------------------------------------
    def handle(self, kind: str, pod: client.V1Pod) -> None:
        uid, node = pod.metadata.uid, pod.spec.node_name
        if kind == "DELETED":
            runner = self.runners.get(uid)
            if runner is not None:
                runner.stop(0.0)  # force-deleted: the object is gone, kill now
            return
        if not node:
            # The agent stands in for the default scheduler only: a pod that names another (a test's own
            # kube-scheduler profile) is that scheduler's to bind.
            mine = pod.spec.scheduler_name in (None, "", DEFAULT_SCHEDULER)
            if mine and pod.metadata.deletion_timestamp is None:
                self.bind(pod)
            return
        if node != self.node:
            return
        if pod.metadata.deletion_timestamp is not None:
            self.delete(pod)
            return
        if uid not in self.runners and pod.status.phase not in ("Succeeded", "Failed"):
            runner = PodRunner(self, pod)
            self.runners[uid] = runner
            runner.start()

    def bind(self, pod: client.V1Pod) -> None:
        binding = client.V1Binding(
            metadata=client.V1ObjectMeta(name=pod.metadata.name, uid=pod.metadata.uid),
            target=client.V1ObjectReference(api_version="v1", kind="Node", name=self.node),
        )
        try:
            # The client cannot parse a Binding's reply (a Status); skip the parsing.
            self.api.create_namespaced_pod_binding(
                pod.metadata.name, pod.metadata.namespace, binding, _preload_content=False
            )
            log.info("bound %s/%s to %s", pod.metadata.namespace, pod.metadata.name, self.node)
        except ApiException as err:
            if err.status not in (404, 409):  # gone, or bound already
                log.warning("binding %s/%s failed: %s", pod.metadata.namespace, pod.metadata.name, err.reason)

    def delete(self, pod: client.V1Pod) -> None:
        """Graceful deletion: stop the processes within the grace period, then remove the object."""
        uid = pod.metadata.uid
        with self._lock:
            if uid in self.deleting:
                return
            self.deleting.add(uid)
        grace = pod.metadata.deletion_grace_period_seconds
        grace = 30.0 if grace is None else float(grace)
        threading.Thread(target=self._finish_deletion, args=(pod, grace), daemon=True).start()

    def _finish_deletion(self, pod: client.V1Pod, grace: float) -> None:
        uid = pod.metadata.uid
        runner = self.runners.get(uid)
        if runner is not None:
            runner.stop(grace)
            runner.finished.wait()
        try:
            self.api.delete_namespaced_pod(
                pod.metadata.name,
                pod.metadata.namespace,
                grace_period_seconds=0,
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=uid)
                ),
            )
        except ApiException as err:
            if err.status not in (404, 409):
                log.warning(
                    "removing %s/%s failed: %s", pod.metadata.namespace, pod.metadata.name, err.reason
                )
        self.runners.pop(uid, None)
        with self._lock:
            self.deleting.discard(uid)

    # -- main loop --------------------------------------------------------------------------------------
    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.register_node()
                break
            except Exception as err:
                log.warning("registering node %s failed (%s); retrying", self.node, err)
                time.sleep(1.0)
        threading.Thread(target=self._heartbeats, daemon=True).start()
        while not self.stopping.is_set():
            try:
                self._watch()
            except Exception as err:  # the API server restarted, the watch expired, ...: list again
                if not self.stopping.is_set():
                    log.warning("pod watch ended (%s); reconnecting", err)
                    time.sleep(1.0)

    def _watch(self) -> None:
        listing = self.api.list_pod_for_all_namespaces()
        seen = set()
        for pod in listing.items:
            seen.add(pod.metadata.uid)
            self.handle("ADDED", pod)
        for uid, runner in list(self.runners.items()):
            if uid not in seen:  # deleted while we were not watching
                runner.stop(0.0)
        stream = watch.Watch()
        self._stream = stream
        for event in stream.stream(
            self.api.list_pod_for_all_namespaces,
            resource_version=listing.metadata.resource_version,
            timeout_seconds=300,
            allow_watch_bookmarks=True,
        ):
            if self.stopping.is_set():
                break
            if event["type"] == "ERROR":
                raise RuntimeError(f"watch error: {event['raw_object']}")
            if event["type"] != "BOOKMARK":
                self.handle(event["type"], event["object"])

    def _heartbeats(self) -> None:
        while not self.stopping.wait(20.0):
            try:
                self.heartbeat()
            except Exception as err:
                log.warning("node heartbeat failed: %s", err)

    def shutdown(self, *_: Any) -> None:
        """Stop every pod's processes (short grace) and the network, then return from run()."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        stream = getattr(self, "_stream", None)
        if stream is not None:
            stream.stop()
        for runner in list(self.runners.values()):
            runner.stop(2.0)
        for runner in list(self.runners.values()):
            runner.finished.wait(10.0)
        self.network.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.agent", description=__doc__)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node", default="conveyor-local")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--checkout", type=Path, required=True, help="checkout whose code pods run")
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter for `conveyor`/`python` commands"
    )
    parser.add_argument("--network", default="auto", choices=("auto", "netns", "loopback"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api = client.CoreV1Api(config.new_client_from_config(config_file=args.kubeconfig))
    agent = Agent(
        api, args.node, args.state_dir.resolve(), args.checkout.resolve(), args.python, args.network
    )
    log.info("agent for node %s: network %s, state in %s", args.node, agent.network.kind, args.state_dir)
    done = threading.Event()

    def on_signal(*_: Any) -> None:
        threading.Thread(target=lambda: (agent.shutdown(), done.set()), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=agent.run, daemon=True).start()
    while not done.wait(1.0):
        pass
    log.info("agent stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
