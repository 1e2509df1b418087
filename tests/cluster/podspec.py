"""How the local agent turns a pod's container into a local process: argv, environment and paths.

There is no image and no container filesystem, so three translations stand in for them:
- the command: `conveyor ...` runs as `python -m conveyor ...` with the agent's venv, and `python`/`python3`
  as that venv's interpreter; the checkout under test is on PYTHONPATH;
- volumes: a path under a volumeMount's mountPath (in env values and args) is rewritten to the volume's host
  directory: hostPath as is, emptyDir and PVCs as directories in the agent's state, configMaps written out;
- names: `{pod}.{service}.{namespace}.svc[.cluster.local]` in env values and args becomes that pod's
  address, as the cluster DNS would resolve a headless Service's pod names.
The termination-message file (terminationMessagePath, and CONVEYOR_TERMINATION_LOG when it names the same
file) becomes a file in the container's state directory, read by the agent after the process exits.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client

SERVICE_NAME = re.compile(
    r"\b([a-z0-9](?:[-a-z0-9]*[a-z0-9])?)\.([a-z0-9-]+)\.([a-z0-9-]+)\.svc(?:\.cluster\.local)?\b"
)
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
FIELD_LABEL = re.compile(r"metadata\.(labels|annotations)\['([^']+)'\]")
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
CONVEYOR_ENTRYPOINT = ("conveyor",)


class PodSpecError(Exception):
    """The pod asks for something the agent cannot provide; the container fails with this message."""


def field_ref(pod: client.V1Pod, path: str, pod_ip: str) -> str:
    """The downward API's fieldRef values."""
    simple = {
        "metadata.name": pod.metadata.name,
        "metadata.namespace": pod.metadata.namespace,
        "metadata.uid": pod.metadata.uid,
        "spec.nodeName": pod.spec.node_name,
        "spec.serviceAccountName": pod.spec.service_account_name,
        "status.podIP": pod_ip,
        "status.hostIP": pod_ip,
    }
    if path in simple:
        return simple[path] or ""
    match = FIELD_LABEL.fullmatch(path)
    if match:
        mapping = (pod.metadata.labels if match[1] == "labels" else pod.metadata.annotations) or {}
        return mapping.get(match[2], "")
    raise PodSpecError(f"env fieldRef {path!r} is not supported by the local agent")


def resolve_names(text: str, address_of: Callable[[str, str], str]) -> str:
    """Replace headless-Service pod names (`pod.svc.ns.svc[.cluster.local]`) with the pods' addresses."""
    return SERVICE_NAME.sub(lambda m: address_of(m[3], m[1]), text)


def rewrite_paths(text: str, mounts: list[tuple[str, str]]) -> str:
    """Rewrite paths under a mountPath to the volume's host directory (longest mountPath first)."""
    for mount, host in mounts:
        text = re.sub(rf"(?<![\w./-]){re.escape(mount.rstrip('/'))}(?=/|$|[\s\"',:;])", host, text)
    return text


class ContainerProcess:
    """argv, env and cwd of one container of a pod, computed once per start."""

    def __init__(
        self,
        api: client.CoreV1Api,
        pod: client.V1Pod,
        container: client.V1Container,
        *,
        pod_dir: Path,
        pvc_dir: Path,
        checkout: Path,
        python: str,
        pod_ip: str,
        address_of: Callable[[str, str], str],
        in_cluster: bool = False,
    ) -> None:
        self.api, self.pod, self.container = api, pod, container
        self.pod_dir, self.pvc_dir, self.checkout, self.python = pod_dir, pvc_dir, checkout, python
        self.pod_ip, self.address_of, self.in_cluster = pod_ip, address_of, in_cluster
        self.dir = pod_dir / container.name
        self.termination_log = self.dir / "termination-log"
        self.mounts = self._mounts()

    def _volume_dir(self, volume: client.V1Volume) -> str:
        ns = self.pod.metadata.namespace
        if volume.host_path is not None:
            return volume.host_path.path
        if volume.persistent_volume_claim is not None:
            path = self.pvc_dir / ns / volume.persistent_volume_claim.claim_name
        elif volume.empty_dir is not None:
            path = self.pod_dir / "volumes" / volume.name
        elif volume.config_map is not None or volume.secret is not None:
            path = self.pod_dir / "volumes" / volume.name
            path.mkdir(parents=True, exist_ok=True)
            if volume.config_map is not None:
                data = self.api.read_namespaced_config_map(volume.config_map.name, ns).data or {}
            else:
                secret = self.api.read_namespaced_secret(volume.secret.secret_name, ns).data or {}
                data = {k: base64.b64decode(v).decode() for k, v in secret.items()}
            for key, value in data.items():
                (path / key).write_text(value)
        else:
            return ""  # projected service-account tokens and the like: not provided
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def _mounts(self) -> list[tuple[str, str]]:
        volumes = {v.name: v for v in self.pod.spec.volumes or []}
        mounts = []
        for mount in self.container.volume_mounts or []:
            volume = volumes.get(mount.name)
            host = self._volume_dir(volume) if volume is not None else ""
            if not host:
                continue
            if mount.sub_path:
                host = os.path.join(host, mount.sub_path)
                Path(host).mkdir(parents=True, exist_ok=True)
            mounts.append((mount.mount_path, host))
        return sorted(mounts, key=lambda m: -len(m[0]))

    def _translate(self, value: str) -> str:
        return resolve_names(rewrite_paths(value, self.mounts), self.address_of)

    def environ(self) -> dict[str, str]:
        """The process environment: a small base (PATH with the venv first, HOME, PYTHONPATH for the
        checkout) plus the container's env, with $(VAR) references expanded like the kubelet does."""
        venv_bin = str(Path(self.python).parent)
        env = {
            "PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "HOSTNAME": self.pod.metadata.name,
            "PYTHONUNBUFFERED": "1",
            # Pods have no CPU isolation here; one thread per process keeps a 2-core machine usable.
            "OMP_NUM_THREADS": "1",
        }
        if self.in_cluster:  # as the kubelet sets them for the `kubernetes` Service
            env |= {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
        ns = self.pod.metadata.namespace
        termination_path = self.container.termination_message_path or DEFAULT_TERMINATION_PATH
        for item in self.container.env or []:
            if item.value_from is None:
                value = VAR_REF.sub(lambda m: env.get(m[1], m[0]), item.value or "")
            elif item.value_from.field_ref is not None:
                value = field_ref(self.pod, item.value_from.field_ref.field_path, self.pod_ip)
            elif item.value_from.config_map_key_ref is not None:
                ref = item.value_from.config_map_key_ref
                value = (self.api.read_namespaced_config_map(ref.name, ns).data or {}).get(ref.key, "")
            elif item.value_from.secret_key_ref is not None:
                ref = item.value_from.secret_key_ref
                raw = (self.api.read_namespaced_secret(ref.name, ns).data or {}).get(ref.key, "")
                value = base64.b64decode(raw).decode()
            else:
                raise PodSpecError(
                    f"env {item.name}: only value, fieldRef, configMapKeyRef, secretKeyRef work"
                )
            env[item.name] = value
        for name, value in list(env.items()):
            if value in (termination_path, DEFAULT_TERMINATION_PATH) and name != "PATH":
                env[name] = str(self.termination_log)
            else:
                env[name] = self._translate(value)
        paths = [str(self.checkout / "worker"), str(self.checkout / "operator"), str(self.checkout)]
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        return env

    def argv(self, env: dict[str, str]) -> list[str]:
        command = self.container.command
        if not command and "conveyor" in (self.container.image or ""):
            command = list(CONVEYOR_ENTRYPOINT)  # what deploy/Dockerfile.* declare as ENTRYPOINT
        if not command or not (command[1:] or self.container.args or command[0] != "conveyor"):
            raise PodSpecError(
                f"container {self.container.name!r} has no command (and args): the local agent ignores "
                "images, so it knows no entrypoint but conveyor images' `conveyor`; set `command`"
            )
        words = [*command, *(self.container.args or [])]
        words = [self._translate(VAR_REF.sub(lambda m: env.get(m[1], m[0]), w)) for w in words]
        if words[0] == "conveyor":
            return [self.python, "-m", "conveyor", *words[1:]]
        if words[0] in ("python", "python3"):
            return [self.python, *words[1:]]
        return words

    def cwd(self) -> str:
        working = self.container.working_dir
        if working:
            translated = rewrite_paths(working, self.mounts)
            if Path(translated).is_dir():
                return translated
        self.dir.mkdir(parents=True, exist_ok=True)
        return str(self.dir)


def summary(obj: Any) -> str:
    return f"{obj.metadata.namespace}/{obj.metadata.name}"
