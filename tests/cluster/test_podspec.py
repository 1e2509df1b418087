"""The agent's translations of a pod into a process (no API server needed)."""

from __future__ import annotations

from kubernetes import client

from tests.cluster.podspec import field_ref, resolve_names, rewrite_paths


def test_headless_service_pod_names_resolve_to_the_pods_addresses():
    addresses = {("ns1", "job-r0-0"): "10.244.0.2", ("ns1", "job-r1-0"): "10.244.0.5"}
    resolve = lambda ns, pod: addresses[(ns, pod)]  # noqa: E731
    assert resolve_names("job-r0-0.job.ns1.svc", resolve) == "10.244.0.2"
    assert (
        resolve_names("tcp://job-r1-0.job.ns1.svc.cluster.local:29500", resolve) == "tcp://10.244.0.5:29500"
    )
    assert resolve_names("example.com", resolve) == "example.com"


def test_paths_under_a_mount_are_rewritten_to_the_volume_directory():
    mounts = [("/ckpt/sub", "/state/a"), ("/ckpt", "/state/pvc/ns/claim")]
    assert rewrite_paths("/ckpt", mounts) == "/state/pvc/ns/claim"
    assert rewrite_paths('{"dir": "/ckpt/run1", "x": "/ckpt/sub/y"}', mounts) == (
        '{"dir": "/state/pvc/ns/claim/run1", "x": "/state/a/y"}'
    )
    assert rewrite_paths("/ckptx /data/ckpt", mounts) == "/ckptx /data/ckpt"


def test_downward_api_field_refs():
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(
            name="p-1", namespace="ns", labels={"apps.kubernetes.io/pod-index": "1"}
        ),
        spec=client.V1PodSpec(containers=[], node_name="n"),
    )
    assert field_ref(pod, "metadata.labels['apps.kubernetes.io/pod-index']", "10.244.0.3") == "1"
    assert field_ref(pod, "status.podIP", "10.244.0.3") == "10.244.0.3"
    assert field_ref(pod, "metadata.namespace", "") == "ns"
