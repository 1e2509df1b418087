"""Export on demand: a fine-tuning checkpoint (any step, any layout) to a plain HF directory, in one process.

    python -m conveyor.train.export_checkpoint MODEL_DIR CHECKPOINT_DIR OUT [--tag step-40] [--dtype bfloat16]

The checkpoint's weights are keyed by global layer index, so the whole model is one stage here, built
on the meta device and filled straight from the checkpoint (the process needs the model's size in
memory); a tensor-parallel checkpoint's shards are joined into whole layers. Without ``--tag``: the checkpoint a resume would use (``latest``, verified).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

from conveyor.commit_protocol import CheckpointError, resume_point, verify
from conveyor.inference.model.families import load_arch
from conveyor.inference.validate import InputError
from conveyor.pipe import reshard
from conveyor.pipe.module import PipelineModule
from conveyor.pipe.sharding import shard_layouts
from conveyor.topology import Layout, Topology
from conveyor.train.export import check_export_path, export
from conveyor.train.hf_layers import pipeline_layers
from conveyor.train.tensor_parallel import mark_layouts


def export_checkpoint(
    model_dir: str | Path,
    checkpoint_dir: str | Path,
    out: str | Path,
    tag: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the weights of ``checkpoint_dir``'s checkpoint (``tag``, default the resume point) as an HF
    directory at ``out``, with ``model_dir``'s config and tokenizer."""
    checkpoint_dir = Path(checkpoint_dir)
    check_export_path(Path(out), checkpoint_dir, model_dir, field="OUT")
    if tag is None:
        committed = resume_point(checkpoint_dir)
        if committed is None:
            raise CheckpointError(f"no checkpoint in {checkpoint_dir}")
        path = committed.path
    else:
        path = checkpoint_dir / tag
        problem = verify(path)
        if problem:
            raise CheckpointError(f"checkpoint {tag!r} in {checkpoint_dir} is not complete: {problem}")
    arch = load_arch(model_dir)
    layers, roles = pipeline_layers(arch)
    with torch.device("meta"):  # no weights allocated twice: the checkpoint fills them
        module = PipelineModule(layers, topology=Topology(Layout()), seed_layers=False)
    module.to_empty(device="cpu")
    mark_layouts(module, roles, arch)
    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state: dict[str, Any] = {"model": module.state_dict(), "optimizer": {}}
    # a tensor-parallel checkpoint's shards, all of them, joined: a cut for one tensor rank
    pending = reshard.plan(state, saved, shard_layouts(module), {}, 0, 1)
    missing = sorted(k for k in state["model"] if f"model.{k}" not in saved)
    if missing:
        raise CheckpointError(
            f"checkpoint {path} has no weights for {', '.join(missing[:5])}: not this model's"
        )
    with warnings.catch_warnings():  # DCP says it runs in one process: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
    reshard.finish(pending)
    module.load_state_dict(state["model"])
    return export(module, roles, arch, module.topology, model_dir, out, dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conveyor.train.export_checkpoint", description=__doc__)
    parser.add_argument("model_dir", help="the HF directory the job fine-tuned (spec.model.path)")
    parser.add_argument("checkpoint_dir", help="the job's checkpoint directory (spec.checkpoint.path)")
    parser.add_argument("out", help="where to write the HF directory")
    parser.add_argument("--tag", help="a checkpoint by name (step-N); default: the resume point")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    try:
        written = export_checkpoint(
            args.model_dir, args.checkpoint_dir, args.out, args.tag, getattr(torch, args.dtype)
        )
    except (CheckpointError, InputError) as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
