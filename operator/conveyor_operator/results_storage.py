"""Whether an inference job's results would outlive its pods, as a pure function.

``spec.inference.output`` is a path inside the worker container. On a volume that dies with the pod
(an emptyDir, a generic ephemeral volume) or on no volume at all (the container's own disk), every
committed result is lost when a group restarts, so the job starts again from the first prompt, and
nothing is left to read once it finishes and its pods stop. ``conveyor run`` writes to this machine's
disk, so only the operator asks this. The reconcile reports it as InvalidSpec, naming the fix.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from conveyor.spec import Mode, PipelineJobSpec

from conveyor_operator import render

# Volume sources whose contents end with the pod (or that are read-only projections of API objects).
POD_SCOPED_SOURCES = ("emptyDir", "ephemeral", "configMap", "secret", "downwardAPI", "projected")


def _mount_holding(path: PurePosixPath, mounts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The mount whose path is the deepest one above ``path`` (mounts nest: the deepest one holds it)."""
    above = [m for m in mounts if path.is_relative_to(PurePosixPath(str(m.get("mountPath", ""))))]
    return max(above, key=lambda m: len(PurePosixPath(m["mountPath"]).parts), default=None)


def results_lost_with_the_pod(spec: PipelineJobSpec) -> list[str]:
    """A message naming ``spec.inference.output`` and the fix when its results would not outlive the
    pod; empty otherwise (and for serve and train jobs)."""
    if spec.mode != Mode.INFERENCE or spec.inference is None:
        return []
    output = PurePosixPath(spec.inference.output)
    field = f"spec.inference.output: {spec.inference.output!r}"
    fix = (
        "put it under checkpoint.path with checkpoint.volume (a PersistentVolumeClaim), or under a "
        "template.volumeMounts path of a claim's volume"
    )
    if not output.is_absolute():
        return [f"{field} is relative, and a pod's working directory is no volume: {fix}"]
    pod = render.placeholder_pod(spec)
    mount = _mount_holding(output, pod["containers"][0].get("volumeMounts", []))
    if mount is None:
        return [
            f"{field} is on the container's own disk (under no volume): its results would be lost with "
            f"the pod, at every restart and when the job ends; {fix}"
        ]
    volume: dict[str, Any] = next(
        (v for v in pod.get("volumes", []) if v.get("name") == mount.get("name")), {}
    )
    source = next((s for s in POD_SCOPED_SOURCES if s in volume), None)
    if source is not None:
        return [
            f"{field} is on the {source} volume {mount.get('name')!r}, which ends with the pod: its results "
            f"would be lost at every restart and when the job ends; {fix}"
        ]
    if mount.get("readOnly"):
        return [f"{field} is on the read-only mount {mount['mountPath']!r}; {fix}"]
    return []
