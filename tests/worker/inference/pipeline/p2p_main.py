"""One rank of the p2p steadiness test: ``python -m tests.worker.inference.pipeline.p2p_main ITEMS OUT``.

Rank 0 sends ITEMS work items (metadata + a hidden-state payload) to rank 1, which answers each with a
token, as generation's ring does; rank 0 writes the CPU seconds of its sending thread in each tenth of the
run (CPU time, not wall time: the test machine is shared) and the channel's backlog of unfinished
sends to OUT (JSON)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from conveyor.distributed import destroy_distributed, init_distributed
from conveyor.inference.pipeline.p2p import Channel, meta_group


def main(items: int, out: str) -> None:
    info = init_distributed(device="cpu")
    channel = Channel(torch.device("cpu"), torch.float32, meta_group())
    hidden, chunk = torch.randn(4, 1, 64), items // 10
    chunks, backlog, started = [], [], time.thread_time()
    for i in range(items):
        if info.rank == 0:
            channel.send_item(torch.tensor([i, 4]), hidden, dst=1)
            meta = channel.recv_meta(src=1)
            channel.recv_payload((int(meta[1]),), src=1, dtype=torch.int64)
            if (i + 1) % chunk == 0:
                chunks.append(time.thread_time() - started)
                backlog.append(channel.backlog())
                started = time.thread_time()
        else:
            meta = channel.recv_meta(src=0)
            channel.recv_payload((4, 1, 64), src=0)
            channel.send_item(torch.tensor([int(meta[0]), 4]), torch.zeros(4, dtype=torch.int64), dst=0)
    channel.flush()
    if info.rank == 0:
        Path(out).write_text(
            json.dumps({"chunks": chunks, "backlog": backlog, "after_flush": channel.backlog()})
        )
    destroy_distributed()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
    # as conveyor.rank does: the interpreter's teardown of a gloo group can abort a finished rank
    # ("terminate called without an active exception", seen 1 run in 10)
    from conveyor.rank import exit_now

    exit_now(0)
