"""A tiny `spec.train.script` for the end-to-end tests: every rank of the job's world all-reduces a
step-dependent value; rank 0 commits each step's result atomically (results and progress in one file), so a
restarted job resumes after the last committed step and its output holds every step exactly once.

Reference (one process): step s gives (s + 1) * W * (W + 1) / 2 for world size W.
"""

import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

STEP_SECONDS = float(os.environ.get("E2E_STEP_SECONDS", "0.5"))


def finish() -> int:
    # The completion contract: a JSON termination message with completed=true, then exit 0.
    with open(os.environ["CONVEYOR_TERMINATION_LOG"], "w") as f:
        json.dump({"completed": True}, f)
    return 0


def main() -> int:
    steps = int(os.environ["CONVEYOR_TRAIN_STEPS"])
    results = Path(os.environ["CONVEYOR_CHECKPOINT_DIR"]) / "results.json"
    committed = json.loads(results.read_text()) if results.exists() else []
    if len(committed) >= steps:
        return finish()  # a restarted pod of a finished job: nothing to repeat
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    for step in range(len(committed), steps):
        value = torch.tensor([float((rank + 1) * (step + 1))])
        dist.all_reduce(value)  # sums (r + 1) * (step + 1) over every rank of the world
        time.sleep(STEP_SECONDS)
        if rank == 0:
            committed.append({"step": step, "value": value.item()})
            tmp = results.with_suffix(".tmp")
            tmp.write_text(json.dumps(committed))
            os.replace(tmp, results)  # commit: results and progress together, atomically
            print(f"committed step {step}", flush=True)
        dist.barrier()  # nobody runs ahead of the commit
    dist.destroy_process_group()
    return finish()


if __name__ == "__main__":
    sys.exit(main())
