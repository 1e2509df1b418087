# TEMPORARY SHIM (not committed): the scratch control plane in /tmp/opk, same API as the cluster branch's.
import os, secrets, subprocess, time
from dataclasses import dataclass
import pytest
from kubernetes import client, config

KC = "/tmp/opk/kubeconfig"

@dataclass
class Cluster:
    kubeconfig: str
    api_client: client.ApiClient
    @property
    def core(self): return client.CoreV1Api(self.api_client)
    @property
    def apps(self): return client.AppsV1Api(self.api_client)
    @property
    def custom(self): return client.CustomObjectsApi(self.api_client)
    def env(self): return dict(os.environ, KUBECONFIG=self.kubeconfig)
    def kubectl(self, *args, check=True, input=None):
        p = subprocess.run([os.path.expanduser("~/.cache/conveyor/k8s/bin/kubectl"), *args], env=self.env(), input=input, capture_output=True, text=True)
        if check and p.returncode: raise AssertionError(p.stderr)
        return p

@pytest.fixture(scope="session")
def k8s_cluster():
    yield Cluster(KC, config.new_client_from_config(config_file=KC))

@pytest.fixture
def k8s_namespace(k8s_cluster):
    name = "t-" + secrets.token_hex(3)
    k8s_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "crds/")
    k8s_cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    k8s_cluster.core.create_namespaced_service_account(name, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="default")))
    yield name
    k8s_cluster.core.delete_namespace(name)
