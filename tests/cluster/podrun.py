"""One pod on the local agent: its containers as local processes, restarted like the kubelet does, and its
status written back through the API.

A PodRunner is a thread per pod. It starts every container (see podspec.py for how a container becomes a
process), polls them, restarts exited ones as restartPolicy says (with a short doubling backoff) and patches
the pod's status whenever it changes: phase, podIP, conditions and containerStatuses with restartCount,
state, lastState and, on exit, exitCode, reason and the termination message. A container with an httpGet
readinessProbe is ready only while the probe answers 2xx (probed every second, whatever periodSeconds says:
tests wait less); without one, while it runs. An httpGet livenessProbe is probed every periodSeconds
after initialDelaySeconds; failureThreshold failures in a row kill the container as the kubelet does
(SIGTERM to its process group, SIGKILL after the pod's grace period) and it restarts in place. stop() ends
the processes the way the kubelet does on deletion: a preStop sleep first (within the grace period), then
SIGTERM to the process group, SIGKILL after the rest of the grace period.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.cluster import probe
from tests.cluster.apiaccess import ServiceForwarder, write_service_account
from tests.cluster.podspec import ContainerProcess, PodSpecError, summary

log = logging.getLogger("agent.pod")
BACKOFF_START, BACKOFF_MAX = 0.5, 8.0  # seconds; the kubelet's are 10 s and 5 min
PROBE_PERIOD = 1.0  # seconds between readiness probes
MESSAGE_LIMIT = 4096  # bytes of termination message kept, as the kubelet does


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _one_of(state: dict[str, Any]) -> dict[str, Any]:
    """A container state for a merge patch: the other two of waiting/running/terminated set to null, so the
    patch replaces the previous state instead of merging into it."""
    return {key: state.get(key) for key in ("waiting", "running", "terminated")}


@dataclass
class Container:
    spec: client.V1Container
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started_at: str = ""
    next_start: float = 0.0  # monotonic time of the next allowed start
    backoff: float = BACKOFF_START
    done: bool = False  # exited and will not restart
    state: dict[str, Any] = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    probed_ready: bool = False  # the readiness probe's last answer (containers with an httpGet probe)
    live_failures: int = 0  # the liveness probe's failures in a row
    started_up: bool = False  # its probe port answered once (the startup probe's success): liveness counts
    next_live_probe: float = 0.0  # monotonic time of the next liveness probe


class PodRunner(threading.Thread):
    def __init__(self, agent: Any, pod: client.V1Pod) -> None:
        super().__init__(name=f"pod-{summary(pod)}", daemon=True)
        self.agent, self.pod = agent, pod
        self.uid = pod.metadata.uid
        self.ns, self.name = pod.metadata.namespace, pod.metadata.name
        self.pod_dir = agent.state_dir / "pods" / f"{self.ns}_{self.name}_{self.uid}"
        self.containers = [Container(c) for c in pod.spec.containers]
        self.policy = pod.spec.restart_policy or "Always"
        self._stop = threading.Event()
        self._grace = 30.0
        self.finished = threading.Event()  # processes gone and network torn down
        self._last_status: dict[str, Any] | None = None
        self.pod_ip = ""
        self._prefix: list[str] = []
        self._forwarder: ServiceForwarder | None = None
        self._netns: str | None = None  # this runner's own network namespace (not the name's newest)
        self.start_time = now()

    # -- lifecycle --------------------------------------------------------------------------------------
    def stop(self, grace: float) -> None:
        self._grace = max(0.0, grace)
        self._stop.set()

    def run(self) -> None:
        try:
            self.pod_dir.mkdir(parents=True, exist_ok=True)
            network = self.agent.network
            self.pod_ip = network.address(self.ns, self.name)
            service_account = None
            if network.kind == "netns" and self.pod.spec.automount_service_account_token is not False:
                service_account = write_service_account(
                    self.agent.api, self.pod, self.agent.ca_pem, self.pod_dir / "serviceaccount"
                )
            self._prefix = network.setup(self.ns, self.name, service_account)
            self._netns = network.netns(self.ns, self.name)
            if self._netns is not None:
                self._forwarder = ServiceForwarder(self._netns, *self.agent.api_address)
            threading.Thread(target=self._probe_loop, name=f"probe-{self.name}", daemon=True).start()
            self._loop()
        except Exception as err:
            log.exception("pod %s/%s: runner failed", self.ns, self.name)
            for c in self.containers:  # make the failure visible through the API, not only in our log
                if c.proc is None and not c.done:
                    c.state = {"waiting": {"reason": "AgentError", "message": f"local agent: {err}"}}
            with contextlib.suppress(Exception):
                self._report()
        finally:
            self._kill_all(self._grace if self._stop.is_set() else 0.0)
            if self._forwarder is not None:
                self._forwarder.close()
            self.agent.network.teardown(self.ns, self.name, self._netns)
            self.finished.set()

    def _loop(self) -> None:
        self._report()
        while not self._stop.is_set():
            for c in self.containers:
                self._step(c)
            self._report()
            if all(c.done for c in self.containers):
                return
            self._stop.wait(0.1)

    # -- readiness --------------------------------------------------------------------------------------
    def _http_get(self, c: Container) -> client.V1HTTPGetAction | None:
        readiness = c.spec.readiness_probe
        return readiness.http_get if readiness is not None else None

    def _probe_port(self, c: Container, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.ports or []:
            if p.name == port:
                return int(p.container_port)
        raise PodSpecError(f"readinessProbe port {port!r} names no port of container {c.spec.name}")

    def _probe(self, c: Container, get: client.V1HTTPGetAction) -> bool:
        """One httpGet probe of a running container, from inside the pod's network namespace."""
        status = self._status(c, get)
        return status is not None and 200 <= status < 400

    def _status(self, c: Container, get: client.V1HTTPGetAction) -> int | None:
        """The HTTP status the probe got; None when nothing answered."""
        if c.proc is None or c.proc.poll() is not None:
            return None
        with contextlib.suppress(OSError, PodSpecError, http.client.HTTPException):
            port = self._probe_port(c, get.port)
            status, _ = probe.request(self._netns, self.pod_ip, port, "GET", get.path or "/", timeout=1.0)
            return status
        return None

    def _probe_loop(self) -> None:
        """Readiness and liveness of each container with httpGet probes."""
        while not self._stop.is_set() and not self.finished.is_set():
            for c in self.containers:
                get = self._http_get(c)
                if get is not None:
                    c.probed_ready = self._probe(c, get)
                self._liveness(c)
            self._stop.wait(PROBE_PERIOD)

    def _liveness(self, c: Container) -> None:
        live = c.spec.liveness_probe
        if live is None or live.http_get is None or c.proc is None or c.proc.poll() is not None:
            c.live_failures, c.started_up = 0, False
            return
        if not c.started_up:
            # the kubelet probes liveness only once the startup probe has passed (the worker's renders a
            # tcpSocket one on the same port): until the port answers, loading is not a failure
            c.started_up = self._status(c, live.http_get) is not None
            c.next_live_probe = time.monotonic() + (live.initial_delay_seconds or 0)
            return
        if time.monotonic() < c.next_live_probe:
            return
        c.next_live_probe = time.monotonic() + (live.period_seconds or 10)
        if self._probe(c, live.http_get):
            c.live_failures = 0
            return
        c.live_failures += 1
        if c.live_failures < (live.failure_threshold or 3):
            return
        c.live_failures = 0
        grace = float(self.pod.spec.termination_grace_period_seconds or 30)
        log.info("pod %s/%s: %s failed its liveness probe; killing it", self.ns, self.name, c.spec.name)
        proc = c.proc
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

        def kill_after_grace() -> None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        threading.Thread(target=kill_after_grace, daemon=True).start()

    def _step(self, c: Container) -> None:
        if c.proc is None:
            if not c.done and time.monotonic() >= c.next_start:
                self._start(c)
            return
        code = c.proc.poll()
        if code is None:
            if time.monotonic() - c.next_start > 10 * BACKOFF_MAX:
                c.backoff = BACKOFF_START  # ran long enough: the next crash starts over, like the kubelet
            return
        self._exited(c, code)

    def _start(self, c: Container) -> None:
        proc = ContainerProcess(
            self.agent.api,
            self.pod,
            c.spec,
            pod_dir=self.pod_dir,
            pvc_dir=self.agent.state_dir / "pvc",
            checkout=self.agent.checkout,
            python=self.agent.python,
            pod_ip=self.pod_ip,
            address_of=self.agent.network.address,
            in_cluster=self._forwarder is not None,
        )
        try:
            env = proc.environ()
            argv = [*self._prefix, *proc.argv(env)]
            cwd = proc.cwd()
        except (PodSpecError, ApiException) as err:
            message = err.args[0] if isinstance(err, PodSpecError) else f"reading the pod's references: {err}"
            self._terminated(c, 128, "CreateContainerConfigError", message, now())
            return
        proc.dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            proc.termination_log.unlink()
        log_path = proc.dir / f"{c.restarts}.log"
        with open(log_path, "ab") as out:
            # Own session = own process group: the kill on deletion reaches every process the command forks.
            c.proc = subprocess.Popen(
                argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        c.proc.termination_log = proc.termination_log  # type: ignore[attr-defined]
        c.started_at = now()
        c.next_start = time.monotonic()
        c.state = {"running": {"startedAt": c.started_at}}
        log.info("pod %s/%s: started %s (pid %d, restart %d): %s", self.ns, self.name, c.spec.name,
                 c.proc.pid, c.restarts, " ".join(argv))  # fmt: skip

    def _exited(self, c: Container, code: int) -> None:
        assert c.proc is not None
        message = ""
        path: Path = c.proc.termination_log  # type: ignore[attr-defined]
        with contextlib.suppress(OSError):
            message = path.read_bytes()[-MESSAGE_LIMIT:].decode(errors="replace")
        exit_code = code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as the runtime reports
        # The runtime ends a container with all of its processes (its cgroup): a child left running (a rank
        # whose supervisor died) would hold its sockets into the next run of the container.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(c.proc.pid, signal.SIGKILL)
        wait_group_gone(c.proc.pid)
        self._terminated(c, exit_code, "Completed" if exit_code == 0 else "Error", message, c.started_at)
        c.proc = None

    def _terminated(self, c: Container, exit_code: int, reason: str, message: str, started: str) -> None:
        terminated = {"exitCode": exit_code, "reason": reason, "startedAt": started, "finishedAt": now()}
        if message:
            terminated["message"] = message
        log.info("pod %s/%s: %s exited %d (%s)", self.ns, self.name, c.spec.name, exit_code, reason)
        restart = self.policy == "Always" or (self.policy == "OnFailure" and exit_code != 0)
        if restart and not self._stop.is_set():
            c.last_state = {"terminated": terminated}
            c.state = {"waiting": {"reason": "CrashLoopBackOff" if exit_code else "Completed"}}
            c.restarts += 1
            c.next_start = time.monotonic() + c.backoff
            c.backoff = min(c.backoff * 2, BACKOFF_MAX)
        else:
            c.state = {"terminated": terminated}
            c.done = True

    def _pre_stop(self, grace: float) -> float:
        """Run the containers' preStop sleeps (the only preStop handler the agent knows) within the grace
        period; returns the grace left for SIGTERM."""
        seconds = 0.0
        for c in self.containers:
            hook = c.spec.lifecycle.pre_stop if c.spec.lifecycle is not None else None
            if hook is not None and hook.sleep is not None and c.proc is not None:
                seconds = max(seconds, float(hook.sleep.seconds))
        seconds = min(seconds, grace)
        if seconds > 0:
            log.info("pod %s/%s: preStop sleep %.0fs", self.ns, self.name, seconds)
            time.sleep(seconds)
        return grace - seconds

    def _kill_all(self, grace: float) -> None:
        grace = self._pre_stop(grace) if grace > 0 else grace
        running = [c.proc for c in self.containers if c.proc is not None and c.proc.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            time.sleep(0.05)
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # also any children left in the group
            proc.wait()
            # Only then may the network go: a process that is still exiting closes its sockets after it
            # frees its memory, and its peers never get that FIN once the pod's interface is deleted.
            wait_group_gone(proc.pid)

    # -- status -----------------------------------------------------------------------------------------
    def _phase(self) -> str:
        if not all(c.done for c in self.containers):
            return "Running" if any(c.proc is not None or c.restarts for c in self.containers) else "Pending"
        codes = [c.state["terminated"]["exitCode"] for c in self.containers]
        return "Succeeded" if all(code == 0 for code in codes) else "Failed"

    def _report(self) -> None:
        phase = self._phase()
        statuses = []
        for c in self.containers:
            running = "running" in c.state
            ready = running and (self._http_get(c) is None or c.probed_ready)
            status = {
                "name": c.spec.name,
                "image": c.spec.image or "",
                "imageID": "",
                "containerID": f"local://{self.uid}/{c.spec.name}/{c.restarts}",
                "ready": ready,
                "started": running,
                "restartCount": c.restarts,
                "state": _one_of(c.state),
                "lastState": _one_of(c.last_state),
            }
            statuses.append(status)
        ready = "True" if phase == "Running" and all(s["ready"] for s in statuses) else "False"
        conditions = [
            {"type": t, "status": s, "lastTransitionTime": self.start_time}
            for t, s in (
                ("PodScheduled", "True"),
                ("Initialized", "True"),
                ("ContainersReady", ready),
                ("Ready", ready),
            )
        ]
        status = {
            "phase": phase,
            "hostIP": self.pod_ip,
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.start_time,
            "conditions": conditions,
            "containerStatuses": statuses,
        }
        if status == self._last_status:
            return
        try:
            # The uid makes the patch apply to this incarnation only: a StatefulSet recreates a deleted pod
            # under the same name, and a late status of the old one (its hung container's exit, seen as
            # the new pod's) would be a failure of the new group (a kubelet writes by uid too).
            body = {"metadata": {"uid": self.uid}, "status": status}
            self.agent.api.patch_namespaced_pod_status(self.name, self.ns, body)
            self._last_status = status
        except ApiException as err:
            if err.status in (404, 409, 422):  # gone, or the name is another pod's now
                self._stop.set()  # the pod is gone (force-deleted): stop its processes now
                self._grace = 0.0
            else:
                log.warning(
                    "pod %s/%s: status update failed (%s); will retry", self.ns, self.name, err.reason
                )


def wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    """Wait until no process of group ``pgid`` is left but zombies (which have closed their files)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(
        _live_in_group(stat, pgid) for stat in Path("/proc").glob("[0-9]*/stat")
    ):
        time.sleep(0.02)


def _live_in_group(stat: Path, pgid: int) -> bool:
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
    except (OSError, IndexError):
        return False
    return fields[2] == str(pgid) and fields[0] not in ("Z", "X")
