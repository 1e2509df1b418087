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

from conveyor.spec import CheckpointRef
from prometheus_client.parser import text_string_to_metric_families

from conveyor_operator.phase import format_time

STEP = "conveyor_last_checkpoint_step"
TIME = "conveyor_last_checkpoint_timestamp_seconds"
TIMEOUT_SECONDS = 1.0
log = logging.getLogger(__name__)


def parse_checkpoint(text: str) -> CheckpointRef | None:
    """The checkpoint in a worker's /metrics text, or None before its first commit."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (STEP, TIME):
                values[sample.name] = max(values.get(sample.name, 0.0), sample.value)
    step, when = values.get(STEP), values.get(TIME)
    if step is None or step < 0:
        return None
    time = format_time(datetime.fromtimestamp(when, UTC)) if when else None
    return CheckpointRef(step=int(step), time=time)


def read_checkpoint(ip: str, port: int) -> CheckpointRef | None:
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=TIMEOUT_SECONDS) as response:
            return parse_checkpoint(response.read().decode("utf-8", "replace"))
    except Exception as err:  # an unreachable pod must never fail a reconcile
        log.debug("checkpoint not scraped", extra={"ip": ip, "error": str(err)})
        return None
