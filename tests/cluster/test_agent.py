"""The local control plane and its pod agent, through the real API server and controller manager."""

from __future__ import annotations

import json
import os
import textwrap
import time

import pytest
from kubernetes import client

from tests.cluster.controlplane import NODE_NAME
from tests.cluster.waiting import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.integration]


def python_container(script: str, env: dict[str, str] | None = None, **extra) -> dict:
    return {
        "name": "main",
        "image": "conveyor-worker:test",  # ignored by the agent
        "command": ["python", "-c", textwrap.dedent(script)],
        "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
        **extra,
    }


def pod_body(name: str, container: dict, restart: str = "Never") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": restart, "terminationGracePeriodSeconds": 2, "containers": [container]},
    }


def headless_service(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"app": name}},
    }


def statefulset(name: str, service: str, replicas: int, container: dict) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": {
            "serviceName": service,
            "replicas": replicas,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": service, "group": name}},
            "template": {
                "metadata": {"labels": {"app": service, "group": name}},
                "spec": {"terminationGracePeriodSeconds": 2, "containers": [container]},
            },
        },
    }


def phase(core: client.CoreV1Api, ns: str, name: str) -> str:
    return core.read_namespaced_pod(name, ns).status.phase


def test_control_plane_serves_the_pinned_version_and_a_ready_node(k8s_cluster):
    version = json.loads(k8s_cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.35.4"
    assert version["clientVersion"]["gitVersion"] == "v1.35.4"
    node = k8s_cluster.core.read_node(NODE_NAME)
    ready = {c.type: c.status for c in node.status.conditions}
    assert ready["Ready"] == "True"
    assert node.status.allocatable["nvidia.com/gpu"] == "8"
    helm = k8s_cluster.helm("version", "--short").stdout
    assert helm.startswith("v3.21.4")


def test_pods_succeed_and_fail_with_exit_codes_and_termination_messages(k8s_cluster, k8s_namespace):
    core, ns = k8s_cluster.core, k8s_namespace
    script = """
        import json, os, sys
        with open(os.environ["CONVEYOR_TERMINATION_LOG"], "w") as f:
            json.dump({"pod": os.environ["POD"], "code": int(os.environ["CODE"])}, f)
        print("hello from", os.environ["POD"], os.environ["NS"])
        sys.exit(int(os.environ["CODE"]))
    """
    for name, code in (("ok", "0"), ("bad", "3")):
        container = python_container(
            script, {"CODE": code, "CONVEYOR_TERMINATION_LOG": "/dev/termination-log"}
        )
        container["env"] += [
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ]
        core.create_namespaced_pod(ns, pod_body(name, container))
    wait_for(lambda: phase(core, ns, "ok") == "Succeeded", "pod ok to succeed")
    wait_for(lambda: phase(core, ns, "bad") == "Failed", "pod bad to fail")
    for name, code in (("ok", 0), ("bad", 3)):
        status = core.read_namespaced_pod(name, ns).status
        terminated = status.container_statuses[0].state.terminated
        assert terminated.exit_code == code
        assert terminated.reason == ("Completed" if code == 0 else "Error")
        assert json.loads(terminated.message) == {"pod": name, "code": code}
        assert status.pod_ip
        assert f"hello from {name} {ns}" in k8s_cluster.pod_logs(ns, name)


def test_restart_policy_always_restarts_and_counts(k8s_cluster, k8s_namespace):
    core, ns = k8s_cluster.core, k8s_namespace
    core.create_namespaced_pod(
        ns, pod_body("crashy", python_container("raise SystemExit(7)"), restart="Always")
    )

    def restarted_twice():
        statuses = core.read_namespaced_pod("crashy", ns).status.container_statuses or []
        return statuses and statuses[0].restart_count >= 2 and statuses[0]

    status = wait_for(restarted_twice, "two restarts")
    assert status.last_state.terminated.exit_code == 7
    assert phase(core, ns, "crashy") == "Running"


def test_statefulset_pods_run_and_deleting_a_pod_kills_its_process(k8s_cluster, k8s_namespace):
    core, apps, ns = k8s_cluster.core, k8s_cluster.apps, k8s_namespace
    script = """
        import os, time
        print("pid", os.getpid(), "index", os.environ["INDEX"], flush=True)
        time.sleep(600)
    """
    container = python_container(script)
    container["env"] = [
        {
            "name": "INDEX",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}},
        }
    ]
    core.create_namespaced_service(ns, headless_service("svc"))
    apps.create_namespaced_stateful_set(ns, statefulset("sleepy", "svc", 2, container))
    for i in range(2):
        wait_for(lambda i=i: f"index {i}" in k8s_cluster.pod_logs(ns, f"sleepy-{i}"), f"sleepy-{i} to run")
    pod = core.read_namespaced_pod("sleepy-1", ns)
    assert pod.status.phase == "Running" and pod.spec.node_name == NODE_NAME
    pid = int(k8s_cluster.pod_logs(ns, "sleepy-1").split()[1])
    os.kill(pid, 0)  # running

    core.delete_namespaced_pod("sleepy-1", ns)

    def process_gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(process_gone, "the deleted pod's process to end", timeout=30)
    # The StatefulSet controller replaces it with a new pod (new uid) that the agent runs again.
    wait_for(
        lambda: (
            (p := core.read_namespaced_pod("sleepy-1", ns)).metadata.uid != pod.metadata.uid
            and p.status.phase == "Running"
        ),
        "the replacement pod",
    )
    assert phase(core, ns, "sleepy-0") == "Running"


RENDEZVOUS = """
    import os, datetime, torch, torch.distributed as dist
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    print("allreduce", value.item(), "group", os.environ["GROUP"], "master", os.environ["MASTER_ADDR"], flush=True)
    dist.destroy_process_group()
    import time; time.sleep(600)
"""


def test_two_groups_rendezvous_through_headless_service_names_on_one_port(k8s_cluster, k8s_namespace):
    """Two StatefulSets, each a 2-rank gloo group meeting at its ordinal 0 by DNS name, on the same port."""
    core, apps, ns = k8s_cluster.core, k8s_cluster.apps, k8s_namespace
    core.create_namespaced_service(ns, headless_service("job"))
    for group in ("job-r0", "job-r1"):
        container = python_container(
            RENDEZVOUS,
            {"GROUP": group, "MASTER_ADDR": f"{group}-0.job.{ns}.svc.cluster.local", "MASTER_PORT": "29500"},
        )
        container["env"].append(
            {
                "name": "RANK",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}},
            }
        )
        apps.create_namespaced_stateful_set(ns, statefulset(group, "job", 2, container))
    for group in ("job-r0", "job-r1"):
        for i in range(2):
            logs = wait_for(
                lambda p=f"{group}-{i}": "allreduce" in (text := k8s_cluster.pod_logs(ns, p)) and text,
                f"{group}-{i} to finish its all-reduce",
                timeout=120,
            )
            assert f"allreduce 3.0 group {group}" in logs, logs


def test_readiness_probe_and_pre_stop_sleep_and_endpoints(k8s_cluster, k8s_namespace, tmp_path):
    """An httpGet readinessProbe decides Ready (and so the Service's ready endpoints); a deletion runs the
    preStop sleep before SIGTERM."""
    core, ns = k8s_cluster.core, k8s_namespace
    flag, stopped = tmp_path / "ready", tmp_path / "sigterm"
    script = """
        import http.server, os, signal, sys, time
        def term(*_):
            open(os.environ["STOPPED"], "w").write(str(time.time()))
            sys.exit(0)
        signal.signal(signal.SIGTERM, term)
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if os.path.exists(os.environ["FLAG"]) else 503)
                self.end_headers()
        http.server.HTTPServer(("", 8080), H).serve_forever()
    """
    container = python_container(
        script,
        {"FLAG": str(flag), "STOPPED": str(stopped)},
        ports=[{"name": "http", "containerPort": 8080}],
        readinessProbe={"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 10},
        lifecycle={"preStop": {"sleep": {"seconds": 2}}},
    )
    body = pod_body("probed", container, restart="Always")
    body["metadata"]["labels"] = {"app": "probed"}
    body["spec"]["terminationGracePeriodSeconds"] = 10
    core.create_namespaced_pod(ns, body)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "probed"},
        "spec": {"selector": {"app": "probed"}, "ports": [{"port": 8080, "targetPort": "http"}]},
    }
    core.create_namespaced_service(ns, service)

    def ready_endpoints() -> list[bool]:
        slices = client.DiscoveryV1Api(k8s_cluster.api_client).list_namespaced_endpoint_slice(
            ns, label_selector="kubernetes.io/service-name=probed"
        )
        return [bool(e.conditions.ready) for s in slices.items for e in s.endpoints or []]

    def pod_ready() -> bool:
        conditions = core.read_namespaced_pod("probed", ns).status.conditions or []
        return any(c.type == "Ready" and c.status == "True" for c in conditions)

    wait_for(lambda: phase(core, ns, "probed") == "Running", "the pod to run")
    wait_for(lambda: ready_endpoints() == [False], "a not-ready endpoint", timeout=30)
    assert not pod_ready(), "running is not ready: the probe answers 503"
    flag.write_text("1")
    wait_for(pod_ready, "the probe to pass", timeout=30)
    wait_for(lambda: ready_endpoints() == [True], "a ready endpoint", timeout=30)
    asked = time.time()
    core.delete_namespaced_pod("probed", ns)
    wait_for(stopped.exists, "SIGTERM after the preStop sleep", timeout=30)
    assert float(stopped.read_text()) - asked >= 1.5
