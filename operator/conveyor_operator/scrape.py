"""Rank 0's last committed checkpoint, read from its Prometheus endpoint while it runs.

Workers report a checkpoint to the operator in their termination message, which exists only after they
exit; a running train job's progress is in rank 0's metrics (``conveyor_last_checkpoint_step`` and
``conveyor_last_checkpoint_timestamp_seconds``, worker/conveyor/metrics.py). Parsing is pure
(``parse_checkpoint``); ``read_checkpoint`` does the one short GET and never raises: a pod that does not
answer leaves the operator with what it knew.
"""

from __future__ import annotations

import logging
import urllib.request
from datetime import UTC, datetime

from conveyor.job_status import CheckpointRef, SkippedCheckpoint
from prometheus_client.parser import text_string_to_metric_families

from conveyor_operator.phase import format_time

STEP = "conveyor_last_checkpoint_step"
TIME = "conveyor_last_checkpoint_timestamp_seconds"
SKIPPED = "conveyor_checkpoints_skipped"
LAST_SKIPPED = "conveyor_checkpoint_last_skipped_step"
TIMEOUT_SECONDS = 1.0
log = logging.getLogger(__name__)


def parse_checkpoint(text: str) -> CheckpointRef | None:
    """The checkpoint in a worker's /metrics text, or None before its first commit; with the checkpoints
    the workers skipped as partial or corrupt (worker/conveyor/skipped_checkpoints.py), if any."""
    values: dict[str, float] = {}
    last_skipped: SkippedCheckpoint | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (STEP, TIME, SKIPPED):
                values[sample.name] = max(values.get(sample.name, 0.0), sample.value)
            elif sample.name == LAST_SKIPPED and "checkpoint" in sample.labels:
                last_skipped = SkippedCheckpoint(
                    name=sample.labels["checkpoint"],
                    step=int(sample.value) if sample.value >= 0 else None,
                    reason=sample.labels.get("reason", ""),
                )
    step, when, skipped = values.get(STEP), values.get(TIME), int(values.get(SKIPPED, 0))
    if step is None or step < 0:
        return None
    time = format_time(datetime.fromtimestamp(when, UTC)) if when else None
    if skipped <= 0:
        return CheckpointRef(step=int(step), time=time)
    return CheckpointRef(step=int(step), time=time, skipped=skipped, last_skipped=last_skipped)


def read_checkpoint(ip: str, port: int) -> CheckpointRef | None:
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=TIMEOUT_SECONDS) as response:
            return parse_checkpoint(response.read().decode("utf-8", "replace"))
    except Exception as err:  # an unreachable pod must never fail a reconcile
        log.debug("checkpoint not scraped", extra={"ip": ip, "error": str(err)})
        return None
