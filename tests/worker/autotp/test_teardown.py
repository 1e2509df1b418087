"""A user's TP-2 script on gloo ends cleanly: every run exits 0, with no gloo worker thread left when the
interpreter tears down.

Before: about 1 run in 7 of the plain script (teardown_main.py) exited 134 ("terminate called without an
active exception") after its tokens were out and correct. The split model's hooks held the TP group, and
transformers' import of ``torch.distributed.nn.functional`` (its defaults are ``group=group.WORLD``, read
at import) held the default group, so ``destroy_process_group`` at exit only unregistered them: their
gloo worker threads ran on into the interpreter's finalization, and one still releasing the tensors of a
finished collective (the last logits' all-gather) needs the GIL there, which ends the thread with an
unwind through a noexcept destructor: std::terminate. The exit code depends on scheduling; the worker
threads left at exit do not, so each run checks both, on the HF modules and under kernel inject.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.worker.inference.launch import start_ranks, wait_ranks

RUNS = 4  # 8 to 15 s each on two CPU processes (mostly imports); the thread census fails at once


@pytest.mark.integration
def test_a_tp2_script_that_just_ends_exits_cleanly(tmp_path: Path) -> None:
    for run in range(RUNS):
        out = tmp_path / str(run)
        out.mkdir()
        inject = ["kernel_inject"] if run % 2 else []  # our decoder's hooks and peers hold the group too
        wait_ranks(
            start_ranks(2, ["-m", "tests.worker.autotp.teardown_main", str(out), *inject]), timeout=120
        )
        for rank in range(2):
            record = json.loads((out / f"rank{rank}.json").read_text())
            assert record["tokens_equal"], record
            assert record["workers_while_running"] > 0, record  # the census sees the groups' threads
            assert record["workers_at_exit"] == 0, (
                f"run {run} rank {rank}: gloo threads left at exit {record}"
            )
