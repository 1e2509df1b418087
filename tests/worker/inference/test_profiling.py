"""The profile summary (profiling.py): the device's busy time counts overlapping kernels once, its idle
gaps name what ran after them, and a profiled block on the CPU writes the host's operators."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from conveyor.inference import profiling

CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


@dataclass
class Event:
    label: str
    kind: torch.autograd.DeviceType
    start: int  # ns
    length: int

    def name(self) -> str:
        return self.label

    def device_type(self) -> torch.autograd.DeviceType:
        return self.kind

    def start_ns(self) -> int:
        return self.start

    def duration_ns(self) -> int:
        return self.length


def test_busy_time_counts_overlaps_once_and_gaps_name_what_followed() -> None:
    ms = 1_000_000
    events = [
        Event("gemm", CUDA, 0, 4 * ms),
        Event("copy", CUDA, 3 * ms, 2 * ms),  # overlaps gemm on another stream: 0-5 ms busy
        Event("aten::mm", CPU, 0, 50 * ms),  # the host's: not the device's timeline
        Event("norm", CUDA, 5 * ms + 100_000, ms),  # 0.1 ms later: launch latency, not a gap
        Event("prefill", CUDA, 10 * ms, 2 * ms),  # after 3.9 ms idle
    ]
    s = profiling.summarize(events, wall=0.02)
    assert abs(s["device_busy_seconds"] - 0.008) < 1e-12
    assert s["gaps"]["count"] == 1 and s["gaps"]["longest"][0]["then"] == "prefill"
    assert abs(s["gaps"]["seconds"] - 0.0039) < 1e-12
    assert s["by_total_time"][0] == {"name": "gemm", "seconds": 0.004, "count": 1}
    assert "aten::mm" not in [r["name"] for r in s["by_total_time"]]


def test_a_profiled_block_on_the_cpu_writes_its_operators(tmp_path: Path) -> None:
    request = profiling.requested({"CONVEYOR_PROFILE_DIR": f" {tmp_path / 'p'} "})
    assert request == profiling.ProfileRequest(tmp_path / "p") and request.directory.is_dir()
    with profiling.profiled(request, "rank0"):
        x = torch.randn(64, 64)
        for _ in range(3):
            x = torch.nn.functional.linear(x, x).relu()
    summary = json.loads((tmp_path / "p" / "rank0.json").read_text())
    assert summary["wall_seconds"] > 0 and summary["device_busy_seconds"] is None
    assert {"aten::linear", "aten::relu"} <= {r["name"] for r in summary["by_total_time"]}
    with profiling.profiled(None, "unused"):  # no directory: nothing profiled or written
        pass
    assert profiling.requested({}) is None
    traced = profiling.requested({"CONVEYOR_PROFILE_DIR": str(tmp_path / "t"), "CONVEYOR_PROFILE_TRACE": "1"})
    assert traced is not None and traced.trace


def test_a_profile_that_cannot_be_written_never_fails_the_job(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A careless directory (a file's path) leaves the generation unprofiled, with a warning naming
    the variable; a directory gone by the end costs the summary, with a warning, not the job."""
    (tmp_path / "file").write_text("x")
    assert profiling.requested({"CONVEYOR_PROFILE_DIR": str(tmp_path / "file" / "p")}) is None
    assert "CONVEYOR_PROFILE_DIR=" in caplog.text
    request = profiling.requested({"CONVEYOR_PROFILE_DIR": str(tmp_path / "gone")})
    assert request is not None
    request.directory.rmdir()
    (tmp_path / "gone").write_text("now a file")
    with profiling.profiled(request, "rank0"):
        torch.ones(3).sum()
    assert "profile not written" in caplog.text
