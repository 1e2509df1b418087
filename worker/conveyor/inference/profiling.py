"""A profile of a rank's generation, asked for with ``CONVEYOR_PROFILE_DIR`` (as vLLM's
``VLLM_TORCH_PROFILER_DIR``): torch.profiler runs over the whole generation, and each rank writes a
summary, ``<dir>/<job>-r<replica>-s<stage>-rank<rank>.json``, and with ``CONVEYOR_PROFILE_TRACE=1`` the
Chrome trace beside it (large: tens of MB for a few seconds of a 7B model).

The summary answers where a job's time goes that a benchmark of its parts does not show: the
device's busy time (the union of its kernels' and copies' intervals) against the wall time, the idle
gaps (what ran after each of the longest: what the device waited for), and the kernels by total time.
On a CPU there is no device timeline: the summary lists the host's operators instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from conveyor.inference.progress import write_json_atomic

log = logging.getLogger(__name__)

GAP_SECONDS = 0.0005  # idle stretches shorter than this are launch latency, not waiting
TOP = 25


@dataclasses.dataclass(frozen=True)
class ProfileRequest:
    directory: Path
    trace: bool = False  # the Chrome trace too


def requested(environ: Any = os.environ) -> ProfileRequest | None:
    """The profile ``CONVEYOR_PROFILE_DIR`` (and ``CONVEYOR_PROFILE_TRACE=1``) ask for, read at a rank's
    start. A profile is a diagnosis, not the job's output: a directory that cannot be made is a
    warning, and the job runs unprofiled rather than failing."""
    value = environ.get("CONVEYOR_PROFILE_DIR", "").strip()
    if not value:
        return None
    try:
        Path(value).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        log.warning(f"CONVEYOR_PROFILE_DIR={value}: {err}; the generation runs unprofiled")
        return None
    return ProfileRequest(Path(value), environ.get("CONVEYOR_PROFILE_TRACE", "").strip() == "1")


@contextlib.contextmanager
def profiled(request: ProfileRequest | None, name: str) -> Iterator[None]:
    """Profiles the block into ``<directory>/<name>.json`` (and ``<name>.trace.json``); without a
    request, runs it as it is. A summary that cannot be written is a warning."""
    if request is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, acc_events=True) as prof:
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    path = request.directory / f"{name}.json"
    summary = summarize(prof.profiler.kineto_results.events(), wall)
    try:
        write_json_atomic(path, summary)
        if request.trace:
            prof.export_chrome_trace(str(request.directory / f"{name}.trace.json"))
    except OSError as err:
        log.warning(f"profile not written to {request.directory}: {err}")
        return
    log.info(
        "profile written",
        extra={
            "path": str(path),
            "wall_seconds": round(wall, 3),
            "device_busy_seconds": summary["device_busy_seconds"],
        },
    )


def summarize(events: Any, wall: float) -> dict[str, Any]:
    """The summary of kineto events (``name()``, ``device_type()``, ``start_ns()``, ``duration_ns()``)
    over ``wall`` seconds."""
    device = [e for e in events if e.device_type() == torch.autograd.DeviceType.CUDA]
    timed = device or [e for e in events if e.device_type() == torch.autograd.DeviceType.CPU]
    totals: dict[str, list[float]] = {}
    for e in timed:
        entry = totals.setdefault(e.name(), [0.0, 0])
        entry[0] += e.duration_ns() / 1e9
        entry[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:TOP]
    summary: dict[str, Any] = {
        "wall_seconds": wall,
        "timeline": "device" if device else "host operators (no device: they nest, so totals overlap)",
        "events": len(timed),
        "by_total_time": [{"name": n, "seconds": s, "count": c} for n, (s, c) in ranked],
        "device_busy_seconds": None,
        "gaps": None,
    }
    if device:
        busy, gaps = _busy_and_gaps(device)
        summary["device_busy_seconds"] = busy
        summary["device_busy_fraction"] = busy / wall if wall else None
        summary["gaps"] = {
            "over_seconds": GAP_SECONDS,
            "count": len(gaps),
            "seconds": sum(g for g, _ in gaps),
            "longest": [{"seconds": g, "then": name} for g, name in sorted(gaps, key=lambda x: -x[0])[:TOP]],
        }
    return summary


def _busy_and_gaps(events: list[Any]) -> tuple[float, list[tuple[float, str]]]:
    """Seconds the device ran anything (overlapping streams counted once), and its idle stretches
    longer than GAP_SECONDS with the name of what ran after each."""
    spans = sorted((e.start_ns(), e.start_ns() + e.duration_ns(), e.name()) for e in events)
    busy, gaps = 0, []
    start, end = spans[0][0], spans[0][1]
    for s, e, name in spans[1:]:
        if s > end:
            busy += end - start
            if (s - end) / 1e9 > GAP_SECONDS:
                gaps.append(((s - end) / 1e9, name))
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    return busy / 1e9, gaps
