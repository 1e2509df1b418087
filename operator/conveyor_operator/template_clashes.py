"""``spec.template`` items that collide with the operator's own rendering, as pure functions.

The template's ``env``, ``volumes``, ``volumeMounts`` and ``imagePullSecrets`` are free-form Kubernetes
objects, appended to the worker's pod as they are. Server-side apply merges those lists by key (an env
var's ``name``, a volume's ``name``, a mount's ``mountPath``, a secret's ``name``), and an applied object
with one key twice is refused whole.
So a template item that reuses a key of the operator's own (``CONVEYOR_JOB``, the ``model`` volume, the
checkpoint's path) or of another template item would make every StatefulSet apply of the job fail: it
would never start, and only the operator's log would say why. The reconcile reports these as
InvalidSpec instead, each naming the item and the fix.
"""

from __future__ import annotations

from typing import Any

from conveyor.spec import PipelineJobSpec

from conveyor_operator import render


def _own_container(spec: PipelineJobSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The worker container and pod volumes the operator renders for ``spec`` without the template's
    items (their keys do not depend on the job's name, group or restart)."""
    template = spec.template.model_copy(update={"env": [], "volumes": [], "volume_mounts": []})
    pod = render.placeholder_pod(spec.model_copy(update={"template": template}))
    return pod["containers"][0], pod["volumes"]


def _clashes(field: str, items: list[dict[str, Any]], key: str, own: dict[str, str], fix: str) -> list[str]:
    """One message per item of ``spec.template.<field>`` whose ``key`` is the operator's (``own``: key ->
    what it is) or an earlier item's."""
    out, seen = [], set()
    for i, item in enumerate(items):
        value = item.get(key)
        if not isinstance(value, str):
            continue  # a missing or odd key is the API server's to refuse, with its own message
        if value in own:
            out.append(f"spec.template.{field}[{i}].{key}: {value!r} is {own[value]}: {fix}")
        elif value in seen:
            out.append(
                f"spec.template.{field}[{i}].{key}: {value!r} is set twice in spec.template.{field}: keep one"
            )
        seen.add(value)
    return out


def template_clashes(spec: PipelineJobSpec) -> list[str]:
    """Every template item whose key the server-side apply would see twice; empty when there is none."""
    container, volumes = _own_container(spec)
    env = {e["name"]: "set by the operator" for e in container["env"]}
    names = {v["name"]: "the name of the operator's own volume" for v in volumes}
    paths = {
        m["mountPath"]: f"where the operator mounts its volume {m['name']!r}"
        for m in container["volumeMounts"]
    }
    t = spec.template
    return (
        _clashes("env", t.env, "name", env, 'remove it (docs/design.md, "Worker environment")')
        + _clashes("volumes", t.volumes, "name", names, "rename it, and its volumeMounts")
        + _clashes("volumeMounts", t.volume_mounts, "mountPath", paths, "choose another mountPath")
        + _clashes("imagePullSecrets", t.image_pull_secrets, "name", {}, "")
    )
