"""Chaos, counted: a seeded fault loop against a real PipelineJob on the local control plane.

One job runs the real engine through the API server, the controller manager, the scheduler, the pod agent
(pods as local processes) and the operator (a local process), while a seeded RNG injects three kinds of
fault at random moments:

- ``worker-kill``: SIGKILL of one rank process of the job (a crash, an OOM kill);
- ``pod-delete``: deletion of one of the job's pods (a person, a controller; graceful, no
  ``DisruptionTarget`` condition, so it is a failure like any other);
- ``operator-kill``: SIGKILL of the operator, a random 0-1.5 s after the fault before it (so mostly in the
  middle of reconciling that fault's restart: writing status, deleting pods), started again 0.2-2 s later.

How the faults are counted (what ``restarts`` in status must equal):

- a worker kill and a pod deletion each take one rank out of the pipeline; its peers then fail on the
  lost connection, and the operator restarts the group once: one group restart each, counted against
  ``backoffLimit`` (``status.restarts``) and in ``status.groups[].restarts``;
- an operator kill restarts nothing: the pods keep running without it, and the next operator continues
  from the status and the objects the last one left (its plan is level-based and idempotent). It counts 0.

So the restarts in status must equal worker kills + pod deletions, exactly: a fault the operator missed, or
one it counted twice (a pod deletion seen once as the deletion and again as the peers' exits; a restart
whose status was written but whose pods were not yet deleted when the operator died), shows as a
difference. To keep that count exact a restarting fault is injected only once the previous restarting
fault has been counted and the group runs whole again (every pod Ready, every rank process up); the moment
within the run after that is random. Near the end of the job (90 % of its work committed) no further
fault is injected, and the report says how many were.

Then: the outputs must equal a clean run's (``conveyor run`` of the same spec, uninterrupted, same layout):
inference, every id exactly once and each result line byte-identical; train, the final weights and
optimizer state bit-for-bit and the same loss at every step (each resumed step included), the exported
model tensor-equal. No orphans: at the end every child is owned by the job, no pod of an earlier restart
is left, no rank process outlives its pod, and deleting the job leaves no object of it behind.

CLI (starts its own control plane, builds it first if needed, and tears it down)::

    python -m tests.e2e.chaos --job inference --seed 1 --kills 20 --deletions 20 --operator-kills 20

``tests/e2e/test_chaos.py`` runs it with a small count in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.waiting import wait_for
from tests.conftest import conveyor_cmd, subprocess_env
from tests.e2e.host_volume import keep_on_the_host

GROUP, VERSION, PLURAL = "conveyor.dev", "v1alpha1", "pipelinejobs"
JOB_LABEL = "conveyor.dev/job"
RESTART_ANNOTATION = "conveyor.dev/restart"
STOP_AT = 0.9  # no fault once this much of the job's work is committed: the next one could miss the run
# One thread per process everywhere: float sums in one order, so the faulted run and the clean one agree
# bit for bit.
THREADS = {"OMP_NUM_THREADS": "1"}


@dataclass
class Fault:
    kind: str  # worker-kill, pod-delete, operator-kill
    target: str
    at_seconds: float  # since the job was submitted
    progress: int  # committed work units when it was injected


@dataclass
class ChaosReport:
    job: str
    seed: int
    asked: dict[str, int]
    injected: dict[str, int] = field(default_factory=dict)
    expected_restarts: int = 0  # worker kills + pod deletions
    restarts: int = 0  # sum of status.groups[].restarts
    budget_restarts: int = 0  # status.restarts
    work_units: int = 0  # prompts or steps
    wall_seconds: float = 0.0  # submission to Succeeded
    clean_seconds: float = 0.0  # the clean run, for scale
    identical: bool = False
    differences: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        counted = self.restarts == self.budget_restarts == self.expected_restarts
        return self.identical and not self.orphans and counted

    def summary(self) -> str:
        return (
            f"{self.job} seed {self.seed}: injected {self.injected} (asked {self.asked}); restarts in status "
            f"{self.restarts} (budget {self.budget_restarts}), expected {self.expected_restarts}; "
            f"outputs identical: {self.identical}; orphans: {self.orphans or 'none'}; "
            f"{self.work_units} work units in {self.wall_seconds:.0f} s (clean run {self.clean_seconds:.0f} s)"
        )


# ---- the two jobs ----


@dataclass
class Workload:
    """A job in two copies: the clean run's spec (local paths) and the cluster's; what to compare."""

    kind: str
    units: int
    clean_spec: dict[str, Any]
    cluster_spec: dict[str, Any]
    progress: Callable[[], int]  # committed units of the cluster run
    compare: Callable[[], list[str]]  # differences between the two runs' outputs ([] = identical)
    pods: int
    ranks: int
    advance: int  # at most this much new work is committed between the group running whole and a fault


def _template(spec: dict[str, Any]) -> dict[str, Any]:
    spec["template"] = {"env": [{"name": k, "value": v} for k, v in THREADS.items()]}
    spec["resources"] = {"gpus": 0, "requests": {"cpu": "100m", "memory": "512Mi"}}
    return spec


def inference_workload(work: Path, restarting_faults: int) -> Workload:
    """2 stages x tensorParallel 2 on a tiny random Llama, seeded sampling, one commit per batch."""
    from conveyor.testing.tiny import save_tiny

    model = save_tiny("llama", work / "model")
    units = 24 + 14 * restarting_faults  # ~11 prompts are committed per fault (observed), with margin
    rows = [
        {"id": i, "input_ids": [5 + i % 200, 9, 11]}
        if i % 2
        else {"id": f"p{i}", "prompt": f"the quick brown fox {i}"}
        for i in range(units)
    ]
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def spec(out: Path) -> dict[str, Any]:
        spec = _template(
            {
                "mode": "inference",
                "device": "cpu",
                "model": {"path": str(model), "dtype": "float32"},
                "parallelism": {"stages": 2, "tensorParallel": 2, "replicas": 1},
                "inference": {
                    "input": str(prompts),
                    "output": str(out / "out.jsonl"),
                    "maxNewTokens": 8,
                    "batchSize": 2,
                    "sampling": {"temperature": 0.7, "seed": 3},
                },
                "checkpoint": {"path": str(out / "ckpt"), "every": 1, "keep": 2},
                "restartPolicy": {"backoffLimit": 1000, "backoffSeconds": 1, "maxBackoffSeconds": 2},
            }
        )
        return keep_on_the_host(spec, out)

    clean, faulted = work / "clean", work / "cluster"
    for d in (clean, faulted):
        d.mkdir(parents=True, exist_ok=True)

    def progress() -> int:
        with contextlib.suppress(OSError):
            return sum(1 for line in (faulted / "out.jsonl").read_bytes().splitlines() if line.strip())
        return 0

    def compare() -> list[str]:
        want = sorted((clean / "out.jsonl").read_bytes().splitlines())
        got = sorted((faulted / "out.jsonl").read_bytes().splitlines())
        ids = [json.loads(line)["id"] for line in got]
        out = []
        if len(ids) != len(set(ids)):
            out.append(f"ids repeated: {sorted({i for i in ids if ids.count(i) > 1}, key=str)}")
        if {json.dumps(r["id"]) for r in rows} != {json.dumps(i) for i in ids}:
            out.append(f"{len(rows)} prompts, {len(set(map(json.dumps, ids)))} distinct ids answered")
        if len(want) != len(rows):
            out.append(f"the clean run answered {len(want)} of {len(rows)} prompts")
        differing = [a for a, b in zip(want, got, strict=False) if a != b]
        if differing or len(want) != len(got):
            out.append(
                f"{len(differing)} result lines differ from the clean run's ({len(got)} vs {len(want)})"
            )
        return out

    return Workload(
        "inference", units, spec(clean), spec(faulted), progress, compare, pods=2, ranks=4, advance=6
    )


def train_workload(work: Path, restarting_faults: int, claim_dir: Path) -> Workload:
    """The fine-tuning path (the pipeline engine, 2 stages, AdamW, a schedule, clipping) on a tiny random
    Llama, a checkpoint every 5 steps on a ReadWriteMany claim, the model exported at the end."""
    from conveyor.testing.tiny import save_tiny

    from tests.worker.train.reference import spec_dict, write_dataset

    model = save_tiny("llama", work / "model")
    data = write_dataset(work / "data.jsonl")
    units = 40 + 16 * restarting_faults  # ~12 steps are committed per fault (observed), with margin
    clean = work / "clean"
    clean.mkdir(parents=True, exist_ok=True)

    def spec(ckpt: Path) -> dict[str, Any]:
        out = _template(spec_dict(model, data, ckpt, stages=2, replicas=1, steps=units))
        out["restartPolicy"] = {"backoffLimit": 1000, "backoffSeconds": 1, "maxBackoffSeconds": 2}
        return out

    cluster_spec = spec(Path("/checkpoints"))
    cluster_spec["checkpoint"]["volume"] = "work"  # the agent maps the claim to claim_dir

    def progress() -> int:
        from conveyor.commit_protocol import latest

        with contextlib.suppress(OSError):
            committed = latest(claim_dir) if claim_dir.exists() else None
            return (committed.step or 0) if committed is not None else 0
        return 0

    def compare() -> list[str]:
        return compare_train(clean / "ckpt", claim_dir, units)

    return Workload(
        "train", units, spec(clean / "ckpt"), cluster_spec, progress, compare, pods=2, ranks=2, advance=10
    )


def _final_state(ckpt: Path, scratch: Path) -> dict[str, Any]:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    name = (ckpt / "latest").read_text().strip()
    dcp_to_torch_save(ckpt / name, scratch)
    state = torch.load(scratch, weights_only=False)
    return {"step": name, "model": state["model"], "optimizer": state["optimizer"]}


def _equal(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def compare_train(clean: Path, faulted: Path, steps: int) -> list[str]:
    """The final checkpoint's model and optimizer state bit-for-bit, and the exported model."""
    from safetensors.torch import load_file

    out = []
    with tempfile.TemporaryDirectory() as scratch:
        want = _final_state(clean, Path(scratch) / "clean.pt")
        got = _final_state(faulted, Path(scratch) / "faulted.pt")
    if not (got["step"] == want["step"] == f"step-{steps}"):
        out.append(f"final checkpoints {got['step']} (faulted) and {want['step']} (clean), want step-{steps}")
    for part in ("model", "optimizer"):
        bad = [k for k in want[part] if k not in got[part] or not _equal(got[part][k], want[part][k])]
        bad += [k for k in got[part] if k not in want[part]]
        if bad:
            out.append(f"{len(bad)} {part} entries differ, e.g. {bad[:3]}")
    exports = [sorted((d / "export").glob("*.safetensors")) for d in (clean, faulted)]
    if not exports[0] or [p.name for p in exports[0]] != [p.name for p in exports[1]]:
        out.append(f"exports differ in files: {exports}")
    for a, b in zip(*exports, strict=False):
        ta, tb = load_file(a), load_file(b)
        if not _equal(ta, tb):
            out.append(f"exported {a.name} differs")
    return out


def step_losses(log: str) -> dict[int, set[float]]:
    """Every loss logged per step ("fine-tune step" records, every incarnation of the group)."""
    out: dict[int, set[float]] = {}
    for line in log.splitlines():
        if '"fine-tune step"' in line:
            record = json.loads(line[line.index("{") :])
            out.setdefault(record["step"], set()).add(record["loss"])
    return out


# ---- the cluster side ----


def job_status(cluster: Any, ns: str, name: str) -> dict[str, Any]:
    obj = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    return obj.get("status") or {}


def group_restarts(status: dict[str, Any]) -> int:
    return sum(int(g.get("restarts") or 0) for g in status.get("groups") or [])


def rank_pids(ns: str, job: str) -> list[int]:
    """Live rank processes (`python -m conveyor.rank`) of the job, found by their environment (the
    agent's paths name the namespace, unique per run)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            environ = (proc / "environ").read_bytes()
            if f"CONVEYOR_JOB={job}".encode() not in environ.split(b"\0") or ns.encode() not in environ:
                continue
            if b"conveyor.rank" not in (proc / "cmdline").read_bytes():
                continue
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(proc.name))
    return sorted(pids)


def job_pods(cluster: Any, ns: str, name: str) -> list[Any]:
    return cluster.core.list_namespaced_pod(ns, label_selector=f"{JOB_LABEL}={name}").items


def whole(cluster: Any, ns: str, name: str, load: Workload) -> bool:
    """Running, every pod Ready and not going, of the current restart, every rank process up."""
    status = job_status(cluster, ns, name)
    if status.get("phase") != "Running":
        return False
    pods = job_pods(cluster, ns, name)
    current = str(group_restarts(status))
    ready = [
        p
        for p in pods
        if p.metadata.deletion_timestamp is None
        and (p.metadata.annotations or {}).get(RESTART_ANNOTATION) == current
        and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
    ]
    return len(ready) == len(pods) == load.pods and len(rank_pids(ns, name)) == load.ranks


def orphans(cluster: Any, ns: str, name: str) -> list[str]:
    """What of the job should not be there once it has succeeded: children not owned by it, pods not
    owned by its StatefulSets or of an earlier restart, rank processes without a pod."""
    uid = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)["metadata"]["uid"]
    found = []
    sets = cluster.apps.list_namespaced_stateful_set(ns).items
    services = cluster.core.list_namespaced_service(ns).items
    for obj in [*sets, *services]:
        owners = [o.uid for o in obj.metadata.owner_references or []]
        if owners != [uid]:
            found.append(f"{obj.kind or type(obj).__name__} {obj.metadata.name} owned by {owners}")
    names = {s.metadata.name for s in sets}
    for pod in cluster.core.list_namespaced_pod(ns).items:
        owners = [o.name for o in pod.metadata.owner_references or []]
        if not set(owners) <= names or not owners:
            found.append(f"pod {pod.metadata.name} owned by {owners}")
    return found


def leftovers(cluster: Any, ns: str, name: str) -> list[str]:
    """Objects of the job (by its label, or owned by it) still there after the job was deleted."""
    out = [f"pod {p.metadata.name}" for p in job_pods(cluster, ns, name)]
    out += [f"statefulset {s.metadata.name}" for s in cluster.apps.list_namespaced_stateful_set(ns).items]
    out += [f"service {s.metadata.name}" for s in cluster.core.list_namespaced_service(ns).items]
    policy = cluster.kubectl("get", "pdb,configmaps", "-n", ns, "-l", f"{JOB_LABEL}={name}", "-o", "name")
    out += policy.stdout.split()
    out += [f"rank process {pid}" for pid in rank_pids(ns, name)]
    return out


def clean_run(spec: dict[str, Any], directory: Path) -> float:
    """`conveyor run` of the spec, uninterrupted (same layout, processes on this machine)."""
    job = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PipelineJob", "metadata": {"name": "clean"}}
    path = directory / "clean-job.yaml"
    path.write_text(yaml.safe_dump({**job, "spec": spec}))
    started = time.monotonic()
    proc = subprocess.run(
        conveyor_cmd("run", str(path)),
        env=subprocess_env(CONVEYOR_LOG_FORMAT="json", **THREADS),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise AssertionError(f"the clean run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    (directory / "clean-run.log").write_text(proc.stdout + proc.stderr)
    return time.monotonic() - started


def submit(cluster: Any, ns: str, name: str, spec: dict[str, Any], directory: Path) -> None:
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "work"},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    job = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PipelineJob", "metadata": {"name": name}}
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump_all([claim, {**job, "spec": spec}]))
    cluster.kubectl("apply", "-n", ns, "-f", str(path))


class FaultLoop:
    """Injects the seeded faults into a running job (see the module's docstring for the rules)."""

    def __init__(
        self,
        cluster: Any,
        ns: str,
        name: str,
        operator: Any,
        load: Workload,
        rng: random.Random,
        journal: Path | None = None,
    ):
        self.cluster, self.ns, self.name = cluster, ns, name
        self.operator, self.load, self.rng = operator, load, rng
        self.started = time.monotonic()
        self.faults: list[Fault] = []
        self.expected = 0
        self.journal = journal  # one JSON line per fault, as it happens (a long run that is cut short)

    def _record(self, kind: str, target: str) -> None:
        fault = Fault(kind, target, round(time.monotonic() - self.started, 1), self.load.progress())
        self.faults.append(fault)
        print(f"chaos: {fault}", flush=True)
        if self.journal is not None:
            counted = group_restarts(self._status())
            with open(self.journal, "a") as f:
                f.write(json.dumps({**asdict(fault), "restartsCountedBefore": counted}) + "\n")

    def _near_end(self) -> bool:
        return self.load.progress() >= STOP_AT * self.load.units

    def _status(self) -> dict[str, Any]:
        return job_status(self.cluster, self.ns, self.name)

    def _ready_for_the_next(self) -> bool:
        """The earlier restarting faults are counted and the group runs whole; raises if it failed, and
        if a fault was counted twice (that is a finding, not something to wait out)."""
        status = self._status()
        if status.get("phase") in ("Failed", "Succeeded"):
            return True
        counted = group_restarts(status)
        if counted > self.expected:
            raise AssertionError(
                f"{counted} restarts counted for {self.expected} restarting faults: {status}"
            )
        return counted == self.expected and whole(self.cluster, self.ns, self.name, self.load)

    def restarting_fault(self, kind: str) -> bool:
        """Inject one worker kill or pod deletion at a random moment of a whole run; False when the job is
        too near its end (or over) for another fault."""
        wait_for(
            self._ready_for_the_next,
            "the job to run whole with every fault counted",
            timeout=600,
            interval=0.2,
        )
        if self._status().get("phase") != "Running" or self._near_end():
            return False
        # The random moment: after a random amount of newly committed work (the run's speed does not
        # matter), then a random fraction of a second (mid-batch, mid-step, mid-commit).
        target = self.load.progress() + self.rng.randint(0, self.load.advance)
        with contextlib.suppress(AssertionError):
            wait_for(lambda: self.load.progress() >= target, "progress", timeout=300, interval=0.05)
        time.sleep(self.rng.uniform(0.0, 0.5))
        if self._status().get("phase") != "Running" or self._near_end():
            return False
        if kind == "worker-kill":
            pids = rank_pids(self.ns, self.name)
            if not pids:
                return False
            pid = self.rng.choice(pids)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._record(kind, f"rank process {pid}")
        else:
            pods = sorted(p.metadata.name for p in job_pods(self.cluster, self.ns, self.name))
            pod = self.rng.choice(pods)
            self.cluster.core.delete_namespaced_pod(pod, self.ns)
            self._record(kind, f"pod {pod}")
        self.expected += 1
        return True

    def operator_fault(self) -> bool:
        if self._status().get("phase") in ("Failed", "Succeeded"):
            return False
        time.sleep(self.rng.uniform(0.0, 1.5))  # mostly inside the reconcile of the fault before
        self.operator.kill()
        self._record("operator-kill", "operator")
        time.sleep(self.rng.uniform(0.2, 2.0))
        self.operator.start()
        return True

    def run(self, kills: int, deletions: int, operator_kills: int) -> None:
        plan = ["worker-kill"] * kills + ["pod-delete"] * deletions + ["operator-kill"] * operator_kills
        self.rng.shuffle(plan)
        for kind in plan:
            done = self.operator_fault() if kind == "operator-kill" else self.restarting_fault(kind)
            if not done and kind != "operator-kill":
                print(f"chaos: the job is near its end; {kind} and the rest not injected", flush=True)
                break


def run_chaos(
    cluster: Any,
    ns: str,
    operator: Any,
    job: str,
    seed: int,
    kills: int,
    deletions: int,
    operator_kills: int,
    work: Path,
    timeout: float = 3600,
) -> ChaosReport:
    """The whole experiment on a namespace with the CRDs and a running operator; returns the report."""
    name = f"chaos-{job}"
    claim_dir = cluster.dir / "agent" / "pvc" / ns / "work"
    load = (
        inference_workload(work, kills + deletions)
        if job == "inference"
        else train_workload(work, kills + deletions, claim_dir)
    )
    report = ChaosReport(
        job, seed, {"worker-kill": kills, "pod-delete": deletions, "operator-kill": operator_kills}
    )
    report.work_units = load.units
    report.clean_seconds = round(clean_run(load.clean_spec, work / "clean"), 1)

    submitted = time.monotonic()
    submit(cluster, ns, name, load.cluster_spec, work)
    loop = FaultLoop(cluster, ns, name, operator, load, random.Random(seed), journal=work / "faults.jsonl")
    try:
        loop.run(kills, deletions, operator_kills)

        def finished() -> dict[str, Any] | None:
            status = job_status(cluster, ns, name)
            if status.get("phase") == "Failed":
                raise AssertionError(f"the job failed: {json.dumps(status, indent=1)}")
            return status if status.get("phase") == "Succeeded" else None

        status = wait_for(finished, f"PipelineJob {name} to succeed", timeout=timeout, interval=1.0)
    finally:
        report.faults = loop.faults
        report.injected = {k: sum(f.kind == k for f in loop.faults) for k in report.asked}
        report.expected_restarts = loop.expected
    report.wall_seconds = round(time.monotonic() - submitted, 1)
    report.restarts, report.budget_restarts = group_restarts(status), int(status.get("restarts") or 0)
    report.differences = load.compare()
    if job == "train":
        report.differences += compare_losses(cluster, ns, name, work / "clean" / "clean-run.log")
    report.identical = not report.differences
    wait_for(lambda: not job_pods(cluster, ns, name), "the finished job's pods to go", timeout=120)
    report.orphans = orphans(cluster, ns, name)
    report.orphans += [f"rank process {pid} after the job's pods went" for pid in rank_pids(ns, name)]
    cluster.kubectl("delete", "pipelinejob", name, "-n", ns, "--timeout=120s")
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not leftovers(cluster, ns, name), "the deleted job's objects to go", timeout=120)
    report.orphans += [f"{x} after the job was deleted" for x in leftovers(cluster, ns, name)]
    return report


def compare_losses(cluster: Any, ns: str, name: str, clean_log: Path) -> list[str]:
    """Every step's loss, in every incarnation of the group, is the clean run's for that step."""
    log = "".join(cluster.pod_logs(ns, f"{name}-{i}") for i in range(2))
    got, want = step_losses(log), step_losses(clean_log.read_text())
    out = []
    if set(got) != set(want):
        out.append(f"steps logged {sorted(set(got) ^ set(want))} in one run only")
    bad = [s for s in want if s in got and got[s] != want[s]]
    if bad:
        out.append(f"losses differ at steps {bad[:10]}: e.g. {got[bad[0]]} vs {want[bad[0]]}")
    return out


# ---- the CLI: a control plane of its own ----


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", choices=["inference", "train"], required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kills", type=int, default=2, help="worker kills (SIGKILL of one rank process)")
    parser.add_argument("--deletions", type=int, default=2, help="pod deletions")
    parser.add_argument(
        "--operator-kills", type=int, default=2, help="operator kills (SIGKILL, then restart)"
    )
    parser.add_argument("--workdir", type=Path, help="where to keep the run (default: a temporary directory)")
    parser.add_argument("--report", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)

    from kubernetes import client as k8s
    from kubernetes import config

    from tests.cluster import binaries, controlplane
    from tests.cluster.fixtures import Cluster, apply_crds
    from tests.e2e.conftest import Operator

    # a SIGTERM (a time limit) still runs the `finally` below: the control plane must not outlive the run
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = args.workdir or Path(tempfile.mkdtemp(prefix=f"chaos-{args.job}-"))
    work.mkdir(parents=True, exist_ok=True)
    binaries.build()
    state = controlplane.up(work / "cluster")
    api = config.new_client_from_config(config_file=state.kubeconfig)
    cluster = Cluster(kubeconfig=state.kubeconfig, dir=Path(state.dir), api_client=api)
    ns = f"chaos-{args.job}-{args.seed}"
    operator = None
    try:
        apply_crds(cluster)
        cluster.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=ns)))
        wait_for(
            lambda: any(
                sa.metadata.name == "default" for sa in cluster.core.list_namespaced_service_account(ns).items
            ),
            "the namespace's default service account",
            timeout=30,
        )
        operator = Operator(cluster, ns, work / "operator.log")
        operator.start()
        report = run_chaos(
            cluster,
            ns,
            operator,
            args.job,
            args.seed,
            args.kills,
            args.deletions,
            args.operator_kills,
            work / "job",
        )
    finally:
        if operator is not None:
            operator.stop()
        api.close()
        controlplane.down(Path(state.dir))
    print(report.summary(), flush=True)
    if args.report:
        args.report.write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=1))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
