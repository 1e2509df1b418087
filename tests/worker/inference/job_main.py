"""One rank of a batch inference job, as the pod worker starts it: ``python -m
tests.worker.inference.job_main LOCAL_RANK`` with the CONVEYOR_* and rank variables set."""

from __future__ import annotations

import sys

from conveyor.env import PodEnv
from conveyor.inference.job import run_rank

if __name__ == "__main__":
    sys.exit(run_rank(PodEnv.from_environ(), int(sys.argv[1])))
