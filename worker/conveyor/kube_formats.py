"""Kubernetes' own string formats, for spec fields the operator passes on to the pods: label keys and
values, resource quantities; and the list-maps of free-form objects (env, volumes) keyed as in a pod.

A value in a bad format made every server-side apply of the job's StatefulSets fail, so the job stayed
Pending and only the operator's log said why. As annotated types, the CRD's schema carries the value
patterns (the API server refuses a bad one at admission) and the model's validator says what is wrong and
how to write it. Map keys have no schema check (a structural schema has no ``propertyNames``, and a CEL
rule over an unbounded map costs too much), so ``check_keys`` leaves them to the model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import AfterValidator, Field

# A qualified name: an optional DNS subdomain prefix and a name of at most 63 characters (label and
# annotation keys, resource names).
LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
# A DNS-1123 subdomain: the names of PriorityClasses, ServiceAccounts, ... (at most 253 characters).
SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# resource.Quantity's canonical form (as the API server's own OpenAPI publishes it).
QUANTITY = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


# The most seconds a duration field takes. The operator turns these into a probe's failureThreshold
# (seconds / 10, an int32 in the pod) and into times (Python's datetime stops at the year 9999), and
# larger values overflowed either: the StatefulSet refused, or every reconcile of the job raising. Ten
# nines, so that the "never" people write (9999999999 s, 317 years) still fits, and a job that ran with it
# stays valid.
MAX_SECONDS = 9_999_999_999


def _label_value(value: str) -> str:
    if not LABEL_VALUE.match(value):
        raise ValueError(
            f"{value!r} is not a label value: letters, digits, '-', '_' and '.', starting and ending with a "
            "letter or digit"
        )
    return value


def _subdomain(value: str) -> str:
    if not SUBDOMAIN.match(value):
        raise ValueError(
            f"{value!r} is not an object name: lower-case letters, digits, '-' and '.', starting and ending "
            "with a letter or digit"
        )
    return value


def _quantity(value: str) -> str:
    if not QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity: write e.g. `2`, `500m`, `16Gi` or `1e3`")
    return value


LabelValue = Annotated[
    str,
    Field(max_length=63, json_schema_extra={"pattern": LABEL_VALUE.pattern}),
    AfterValidator(_label_value),
]
ObjectName = Annotated[
    str, Field(max_length=253, json_schema_extra={"pattern": SUBDOMAIN.pattern}), AfterValidator(_subdomain)
]
# At most 64 characters (any real quantity is far shorter): the API server's cost estimate of the CEL rule
# that compares requests with limits needs a bound.
Quantity = Annotated[
    str, Field(max_length=64, json_schema_extra={"pattern": QUANTITY.pattern}), AfterValidator(_quantity)
]


def _keyed_by(key: str) -> Any:
    """A free-form Kubernetes object with a string ``key`` (declared, so CEL rules can read it)."""
    return Field(
        json_schema_extra={
            "x-kubernetes-preserve-unknown-fields": True,
            "properties": {key: {"type": "string"}},
            "required": [key],
        }
    )


def list_map(key: str, max_items: int) -> Any:
    """A list that server-side apply merges by ``key`` (a list-map): the API server refuses an item without
    it or a key twice. ``max_items`` keeps its cost estimate of the CEL rules that go through the list
    within its budget."""
    return Field(
        default_factory=list,
        max_length=max_items,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [key]},
    )


# Free-form Kubernetes objects (tolerations, affinity, volumes, ...) are validated by the API server
# against core/v1 when the pod is created; we pass them through untouched.
KubeObject = Annotated[
    dict[str, Any], Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
]
NamedObject = Annotated[dict[str, Any], _keyed_by("name")]
MountObject = Annotated[dict[str, Any], _keyed_by("mountPath")]


def check_keys(keys: Iterable[str], what: str) -> None:
    """Raise naming the first key of ``keys`` that is not a qualified name (``what``: e.g. a label key)."""
    for key in keys:
        if not LABEL_KEY.match(key) or len(key.rpartition("/")[0]) > 253:
            raise ValueError(
                f"{key!r} is not {what}: `prefix/name` or `name`, the prefix a DNS subdomain of at most 253 "
                "characters, the name at most 63 letters, digits, '-', '_' and '.', starting and ending with a "
                "letter or digit"
            )
