"""``spec.template`` items that collide with the operator's actual rendering, as a pure function: the
backstop of the spec model's and the CRD's own check (conveyor.template_keys, which knows the operator's
keys from a table).

The template's ``env``, ``volumes`` and ``volumeMounts`` are appended to the worker's pod as they are,
and server-side apply merges those lists by key; one key twice makes every StatefulSet apply of the job
fail. ``PipelineJobSpec`` refuses such a template already; this check compares it with what ``render``
really produces, so a rendering that outgrew the table (a new env var, a new volume) still reports
InvalidSpec naming the item and the fix, instead of an apply error only the operator's log shows.
"""

from __future__ import annotations

from conveyor.spec import PipelineJobSpec
from conveyor.template_keys import clashes

from conveyor_operator import render


def template_clashes(spec: PipelineJobSpec) -> list[str]:
    """Every template item whose key the server-side apply would see twice; empty when there is none."""
    # The worker container and pod volumes rendered without the template's items (their keys do not
    # depend on the job's name, group or restart).
    template = spec.template.model_copy(update={"env": [], "volumes": [], "volume_mounts": []})
    pod = render.placeholder_pod(spec.model_copy(update={"template": template}))
    container = pod["containers"][0]
    return clashes(
        spec,
        env=[e["name"] for e in container["env"]],
        volumes=[v["name"] for v in pod["volumes"]],
        mounts={m["mountPath"]: m["name"] for m in container["volumeMounts"]},
    )
