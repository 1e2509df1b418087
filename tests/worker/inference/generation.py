"""Generation as the inference tests run it: the output ids of a ``run_generation``, and ``conveyor generate``
as a child process. (The one-process reference rank is ``conveyor.testing.reference.one_process_rank``.)"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from conveyor.inference.model.stage_model import StageModel
from conveyor.inference.pipeline.generate import PipelinePeers, Request, SchedulerHooks, run_generation
from conveyor.inference.pipeline.sampling import SamplingParams

from tests.conftest import conveyor_cmd, subprocess_env

CPU = torch.device("cpu")


def output_ids(
    model: StageModel,
    peers: PipelinePeers,
    params: SamplingParams,
    requests: Iterable[Request],
    *,
    lanes_per_micro_batch: int,
    micro_batches: int = 1,
    device: torch.device = CPU,
    key: Callable[[Any], Any] = lambda request_id: request_id,
    **options: Any,
) -> dict[Any, list[int]]:
    """``run_generation`` (``options``: its other keywords); each request's output ids by
    ``key(request id)``."""
    got: dict[Any, list[int]] = {}
    run_generation(
        model,
        peers,
        params,
        requests,
        micro_batches=micro_batches,
        lanes_per_micro_batch=lanes_per_micro_batch,
        device=device,
        hooks=SchedulerHooks(on_result=lambda r: got.__setitem__(key(r.id), r.output_ids)),
        **options,
    )
    return got


def conveyor_generate(
    model_dir: str | Path, prompts: list[str], *options: str, timeout: float = 240, **env: str
) -> subprocess.CompletedProcess[str]:
    """``conveyor generate --model DIR OPTIONS --prompt P ...`` as a child process (``env``: extra
    environment)."""
    return subprocess.run(
        conveyor_cmd(
            "generate", "--model", str(model_dir), *options, *[a for p in prompts for a in ("--prompt", p)]
        ),
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rows_by_prompt(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    """The JSON lines ``conveyor generate`` printed, by prompt; the run must have succeeded."""
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r["prompt"]: r for r in map(json.loads, proc.stdout.splitlines())}
