"""A user's TP-2 script as DeepSpeed's examples write it, at module level: join the group, split a model,
generate, and end by falling off the end (no destroy_process_group, no os._exit). Besides the tokens
(checked against the model before it was split), each rank records the gloo worker threads still running
when the interpreter starts to tear down, after every atexit handler (ours included) has run.

    python -m tests.worker.autotp.teardown_main OUT_DIR [kernel_inject]
"""

import atexit
import json
import os
import sys
from pathlib import Path

import torch


def gloo_workers() -> int:
    """Threads of live gloo process groups (each runs its collectives on ``pt_gloo_runloop`` threads)."""
    names = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    return names.count("pt_gloo_runloop")


out = Path(sys.argv[1]) / f"rank{os.environ['RANK']}.json"
record: dict[str, object] = {}
# registered before init_distributed registers its own, so it runs after it (atexit is last-in first-out)
atexit.register(lambda: out.write_text(json.dumps({**record, "workers_at_exit": gloo_workers()})))

import conveyor  # noqa: E402

from tests.worker.autotp.families import build, prompt  # noqa: E402

torch.set_num_threads(1)
conveyor.init_distributed(backend="gloo", device="cpu")
model, _ = build("llama")
ids = prompt()
greedy = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
reference = model.generate(input_ids=ids, **greedy)
engine = conveyor.init_inference(
    model,
    tensor_parallel={"tp_size": 2},
    dtype=torch.float32,
    replace_with_kernel_inject=sys.argv[2:] == ["kernel_inject"],
)
tokens = engine.generate(input_ids=ids, **greedy)
record["tokens_equal"] = bool(torch.equal(tokens, reference))
record["workers_while_running"] = gloo_workers()
