"""The only module that talks to the Kubernetes API (kopf's own watching aside).

Children are written with server-side apply under one field manager, ``conveyor-operator``, with
``force`` (the operator owns the fields it sets; a user's extra fields under another manager stay).
Unit tests replace the client with ``set_client(fake)``; nothing else in the package imports the
``kubernetes`` client.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any, Protocol

from conveyor.job_status import PipelineJobStatus
from conveyor.spec import GROUP, PLURAL, VERSION
from pydantic import BaseModel

from conveyor_operator.render import JOB_LABEL

FIELD_MANAGER = "conveyor-operator"
log = logging.getLogger(__name__)

# Kinds of children, (apiVersion, kind), deleted together after the TTL.
CHILD_KINDS = [("apps/v1", "StatefulSet"), ("v1", "Service"), ("policy/v1", "PodDisruptionBudget")]
# Children of kinds a cluster may not serve (Volcano's PodGroup, only with schedulerName: volcano).
OPTIONAL_CHILD_KINDS = [("scheduling.volcano.sh/v1beta1", "PodGroup")]


class Client(Protocol):
    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def list_pods(self, namespace: str, job: str) -> list[dict[str, Any]]: ...
    def apply(self, obj: dict[str, Any]) -> None: ...
    def delete_pod(self, namespace: str, name: str, uid: str | None = None, force: bool = False) -> None: ...
    def label_pod(self, namespace: str, name: str, labels: dict[str, str]) -> None: ...
    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None: ...
    def event(self, job: dict[str, Any], type_: str, reason: str, message: str) -> None: ...
    def children_exist(self, namespace: str, job: str) -> bool: ...
    def delete_children(self, namespace: str, job: str) -> None: ...
    def delete_statefulset(self, namespace: str, name: str) -> None: ...


def refusal(err: Exception) -> str | None:
    """The API server's words when it refused an object as invalid (422 Unprocessable Entity): a valid
    spec that renders into objects the server does not take (a bad toleration, affinity or volume source
    in spec.template). None for any other error, which the reconcile raises and kopf retries."""
    if getattr(err, "status", None) != 422:
        return None
    try:
        return str(json.loads(getattr(err, "body", None) or "")["message"])
    except (TypeError, ValueError, KeyError):
        return str(err)


def status_patch(status: PipelineJobStatus) -> dict[str, Any]:
    """A merge patch that sets the whole status: fields that are now empty are sent as null, so a cleared
    field (a failure that was handled) does not linger from the previous status."""
    body = status.model_dump(by_alias=True, mode="json", exclude_none=True)
    _null_missing(status, body)
    return body


def _null_missing(model: BaseModel, body: dict[str, Any]) -> None:
    """Send every field a model leaves empty as null, in nested objects too (a merge patch merges them
    key by key: an omitted key would keep its old value, e.g. a finished rollout's strategy)."""
    for name, info in type(model).model_fields.items():
        key = info.alias or name
        body.setdefault(key, None)
        value = getattr(model, name)
        if isinstance(value, BaseModel) and isinstance(body.get(key), dict):
            _null_missing(value, body[key])


class KubeClient:
    """The real client (kubernetes python client; configuration loaded by the caller)."""

    def __init__(self, api_client: Any = None) -> None:
        from kubernetes import client, dynamic

        self._api = api_client or client.ApiClient()
        self.core = client.CoreV1Api(self._api)
        self.custom = client.CustomObjectsApi(self._api)
        self.dynamic = dynamic.DynamicClient(self._api)

    @staticmethod
    def _missing(err: Exception) -> bool:
        return getattr(err, "status", None) == 404

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            job: Any = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            return dict(job)
        except Exception as err:
            if self._missing(err):
                return None
            raise

    def list_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"{JOB_LABEL}={job}")
        return [self._api.sanitize_for_serialization(p) for p in pods.items]

    def apply(self, obj: dict[str, Any]) -> None:
        resource = self.dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        self.dynamic.server_side_apply(
            resource,
            body=obj,
            namespace=obj["metadata"].get("namespace"),
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
        )

    def delete_pod(self, namespace: str, name: str, uid: str | None = None, force: bool = False) -> None:
        """Delete a pod within its own grace period (``force``: at once, without waiting for its node);
        with ``uid``, only that incarnation (409 Conflict: it was replaced already)."""
        from kubernetes import client

        grace = 0 if force else None
        body = client.V1DeleteOptions(
            grace_period_seconds=grace, preconditions=client.V1Preconditions(uid=uid) if uid else None
        )
        try:
            self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=grace, body=body)
        except Exception as err:
            if not (self._missing(err) or (uid and getattr(err, "status", None) == 409)):
                raise

    def label_pod(self, namespace: str, name: str, labels: dict[str, str]) -> None:
        try:
            self.core.patch_namespaced_pod(name, namespace, {"metadata": {"labels": labels}})
        except Exception as err:
            if not self._missing(err):
                raise

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status}
        )

    def event(self, job: dict[str, Any], type_: str, reason: str, message: str) -> None:
        from kubernetes import client

        meta = job["metadata"]
        now = datetime.datetime.now(datetime.UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
            involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind="PipelineJob",
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta.get("uid"),
            ),
            reason=reason,
            message=message[:1024],
            type=type_,
            source=client.V1EventSource(component=FIELD_MANAGER),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        try:
            self.core.create_namespaced_event(meta["namespace"], body)
        except Exception as err:  # an Event lost must never fail a reconcile
            log.warning("event not posted", extra={"reason": reason, "error": str(err)})

    def delete_statefulset(self, namespace: str, name: str) -> None:
        """A group scaled away: its StatefulSet, and its Volcano PodGroup (same name) where there is one."""
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        for api_version, kind in [("apps/v1", "StatefulSet"), *OPTIONAL_CHILD_KINDS]:
            try:
                resource = self.dynamic.resources.get(api_version=api_version, kind=kind)
            except ResourceNotFoundError:
                if (api_version, kind) in OPTIONAL_CHILD_KINDS:
                    continue  # not installed: there is none to delete
                raise
            try:
                resource.delete(name=name, namespace=namespace, body={"propagationPolicy": "Background"})
            except Exception as err:
                if not self._missing(err):
                    raise

    def _children(self, namespace: str, job: str) -> list[tuple[Any, str]]:
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        out = []
        for api_version, kind in CHILD_KINDS + OPTIONAL_CHILD_KINDS:
            try:
                resource = self.dynamic.resources.get(api_version=api_version, kind=kind)
            except ResourceNotFoundError:
                if (api_version, kind) in OPTIONAL_CHILD_KINDS:
                    continue  # not installed: the job cannot have any
                raise
            items = resource.get(namespace=namespace, label_selector=f"{JOB_LABEL}={job}").items
            out += [(resource, item.metadata.name) for item in items]
        return out

    def children_exist(self, namespace: str, job: str) -> bool:
        return bool(self._children(namespace, job))

    def delete_children(self, namespace: str, job: str) -> None:
        for resource, name in self._children(namespace, job):
            try:
                resource.delete(name=name, namespace=namespace, body={"propagationPolicy": "Background"})
            except Exception as err:
                if not self._missing(err):
                    raise


_client: Client | None = None


def set_client(client: Client | None) -> None:
    """Install the client the handlers use (tests install a fake)."""
    global _client
    _client = client


def get_client() -> Client:
    global _client
    if _client is None:
        _client = KubeClient()
    return _client


def load_config() -> None:
    """In a pod: the service account; elsewhere: $KUBECONFIG / ~/.kube/config."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def ensure_peering(name: str, namespaces: list[str], clusterwide: bool) -> None:
    """Create kopf's peering object(s) if missing, so that leader election works out of the box (the
    peering CRDs come from crds/kopf-peering.yaml)."""
    from kubernetes import client

    custom = client.CustomObjectsApi()
    targets = [None] if clusterwide or not namespaces else namespaces
    for ns in targets:
        kind, plural = (
            ("ClusterKopfPeering", "clusterkopfpeerings") if ns is None else ("KopfPeering", "kopfpeerings")
        )
        body = {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": {"name": name}}
        try:
            if ns is None:
                custom.create_cluster_custom_object("kopf.dev", "v1", plural, body)
            else:
                custom.create_namespaced_custom_object("kopf.dev", "v1", ns, plural, body)
        except Exception as err:
            code = getattr(err, "status", None)
            if code == 404:
                raise SystemExit(
                    f"conveyor operator: the {kind} CRD is missing, so leader election cannot work: "
                    "`kubectl apply --server-side -f crds/kopf-peering.yaml`, or run with --standalone"
                ) from None
            if code != 409:  # 409: exists already
                raise
