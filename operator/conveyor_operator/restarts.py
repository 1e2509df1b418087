"""In-place restarts of the worker container, each accounted once (pure).

The kubelet restarts a StatefulSet pod's container in place after any exit (same pod, same uid,
``restartCount`` + 1) and keeps only the newest exit in ``lastState``. So the exit code of one exit can be
overwritten before the operator looks (a crash, then the resumed worker finishing, both within one slow
reconcile), and a level-based "is there a failed exit in lastState" check either misses the crash or,
after a re-reconcile, cannot tell an old exit from a new one.

The operator therefore keeps a watermark per pod in ``status.groups[].containerRestarts``: the pod's uid,
how many exits it has accounted, and whether the worker had reported completion. Each reconcile looks
only at exits past the watermark and then moves it, so a repeated reconcile never counts an exit twice,
and a pod recreated under the same name (a new uid) starts from 0 without touching the group's restart
count. An exit past the watermark is a failure when

- it is visible and non-zero (not one caused by the pod's deletion), or
- it is no longer visible (its number is below what ``lastState`` shows) and the worker had not reported
  completion before it, nor does it report completion after it: the worker exited for a reason the
  operator could not see, and its peers are stuck in a collective without it.

Exits after a reported completion are a finished worker's re-exits (it finds its work committed and exits
0 again), never failures. Each failure restarts the whole group, exactly as a failed pod does.
"""

from __future__ import annotations

from collections.abc import Sequence

from conveyor.job_status import ContainerRestarts

from conveyor_operator.observe import PodFailure, PodObservation
from conveyor_operator.render import WORKER_CONTAINER


def account_pod(
    pod: PodObservation, mark: ContainerRestarts | None
) -> tuple[PodFailure | None, ContainerRestarts | None]:
    """The first failure among the pod's exits past ``mark``, and the moved watermark (None: no exits)."""
    # Another uid: a new pod under the same name, counted from 0. A listing older than the watermark
    # (a stale cache) shows nothing new.
    same_pod = mark is not None and mark.uid == pod.uid
    done = mark.terminations if mark is not None and same_pod else 0
    completed = bool(mark is not None and same_pod and mark.completed)
    visible = {t.index: t for t in pod.terminations}
    failure: PodFailure | None = None
    unseen: list[int] = []
    for index in range(done + 1, pod.exits + 1):
        term = visible.get(index)
        if term is None:
            if not completed:
                unseen.append(index)
            continue
        if term.failed and not completed and failure is None:
            failure = (
                PodFailure("ContainerRestarted", f"{term.describe(pod.name)}, restarted in place")
                if term.restarted
                else PodFailure("PodFailed", term.describe(pod.name))
            )
        if term.completed:
            completed = True
            unseen = []  # the worker finished after them: its work is committed, nothing is stuck
    if failure is None and unseen:
        failure = PodFailure(
            "ContainerRestarted",
            f"pod {pod.name}: container {WORKER_CONTAINER} restarted in place (restartCount {pod.exits}); "
            f"the exit code of exit {unseen[0]} was overwritten before the operator saw it",
        )
    exits = max(done, pod.exits)
    if exits == 0:
        return failure, None
    return failure, ContainerRestarts(pod=pod.name, uid=pod.uid, terminations=exits, completed=completed)


def account_group(
    pods: Sequence[PodObservation], marks: Sequence[ContainerRestarts]
) -> tuple[PodFailure | None, list[ContainerRestarts]]:
    """Account every pod of a group's current generation: the first new failure (by pod index) and the new
    watermarks. Marks of pods that are gone are dropped: their exits belong to a pod that no longer runs."""
    # By uid: a pod already gone (seen in a watch event) and its replacement may share a name.
    by_uid = {m.uid or m.pod: m for m in marks}
    first: PodFailure | None = None
    moved: list[ContainerRestarts] = []
    for pod in sorted(pods, key=lambda p: p.index):
        failure, mark = account_pod(pod, by_uid.get(pod.uid or pod.name))
        first = first or failure
        if mark is not None:
            moved.append(mark)
    return first, moved
