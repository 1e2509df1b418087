"""Whose checkpoint this is: a fine-tuning run's identity, saved in every checkpoint and checked on resume.

A checkpoint holds weights trained from one model on one dataset and a *position* in that dataset's
order. Resumed by a spec with another model, another dataset, or settings that change the data order
or the optimizer, training would go on silently from another run's weights at a position that means
nothing in this run's data, and a run that found another run's last checkpoint reported success with
that run's export. The identity (digests of the model and the dataset, and those settings) is saved in
the checkpoint's client state; a resume refuses a checkpoint whose identity differs. What may change
across a restart is left out: ``steps`` (a run may be extended), the layout (checkpoints reshard), the
checkpoint and export settings, the precision and activation checkpointing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from conveyor.commit_protocol import CheckpointError
from conveyor.inference.progress import file_digest, identity_difference, model_digest
from conveyor.spec import PipelineJobSpec

KEY = "run"  # the identity's key in a checkpoint's client state


def run_identity(spec: PipelineJobSpec, global_batch: int) -> dict[str, Any]:
    """The model, the dataset, and the settings that decide the data order and the updates;
    ``digest`` sums them up."""
    train, model = spec.train, spec.model
    assert train is not None and model is not None and train.dataset is not None
    identity: dict[str, Any] = {
        "model": model_digest(model.path),
        "dataset": file_digest(Path(train.dataset)),
        "settings": {
            "seqLength": train.seq_length,
            "packing": train.packing,
            "seed": train.seed,
            "globalBatchSize": global_batch,
            "optimizer": train.optimizer.model_dump(mode="json"),
            "scheduler": train.scheduler.model_dump(mode="json") if train.scheduler else None,
            "gradientClipping": train.gradient_clipping,
        },
    }
    identity["digest"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return identity


def _difference(theirs: dict[str, Any], ours: dict[str, Any]) -> str:
    what = {"model": "another model", "dataset": "another dataset"}
    return identity_difference(theirs, ours, what, "another run")


def _derived_batch_fix(theirs: dict[str, Any], ours: dict[str, Any], spec: PipelineJobSpec | None) -> str:
    """The fix when the global batch differs only because the spec leaves it to microBatchSize x
    replicas and the replicas changed: the spec never named the setting the refusal names."""
    train = spec.train if spec is not None else None
    saved = (theirs.get("settings") or {}).get("globalBatchSize")
    if spec is None or train is None or train.global_batch_size is not None or not isinstance(saved, int):
        return ""
    if saved == ours["settings"]["globalBatchSize"]:
        return ""
    micro, replicas = train.micro_batch_size, spec.parallelism.replicas
    derived = (
        f"spec.train.globalBatchSize is not set, so it is microBatchSize x replicas ({micro} x {replicas} = "
        f"{micro * replicas}), and it changes with spec.parallelism.replicas"
    )
    if saved % (micro * replicas):
        return (
            f"{derived}; that run's globalBatchSize {saved} is not a multiple of microBatchSize x replicas "
            f"({micro} x {replicas} = {micro * replicas}): to resume it, set spec.train.globalBatchSize: {saved} "
            "with a microBatchSize and replicas whose product divides it; "
        )
    return (
        f"{derived}: set spec.train.globalBatchSize: {saved} to resume that run with {replicas} replica(s); "
    )


def check(
    client_state: Any, ours: dict[str, Any], path: Path | None, spec: PipelineJobSpec | None = None
) -> bool:
    """Refuse a checkpoint of another run (CheckpointError: one line, exit 2, no restart). False: the
    checkpoint carries no identity (saved before it was recorded), resumed as it always was. ``spec``:
    this run's, for the fix when its global batch is derived from the replicas."""
    theirs = client_state.get(KEY) if isinstance(client_state, dict) else None
    if theirs is None:
        return False
    if not isinstance(theirs, dict) or theirs.get("digest") != ours["digest"]:
        why = _difference(theirs, ours) if isinstance(theirs, dict) else "an unreadable identity"
        batch_fix = _derived_batch_fix(theirs, ours, spec) if isinstance(theirs, dict) else ""
        raise CheckpointError(
            f"checkpoint {path} is another run's (it was saved with {why}): {batch_fix}set spec.checkpoint.path "
            "to a new directory or move the old one away, or restore that run's model, dataset and settings"
        )
    return True
