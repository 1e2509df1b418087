"""One rank of the tensor-parallel encoder test: ``python -m tests.worker.inference.model.encoder_main DIR OUT``.
Writes the embeddings of ``SENTENCES`` (rank 0) as a torch file."""

from __future__ import annotations

import sys

import torch
from conveyor.distributed import destroy_distributed, init_distributed
from conveyor.inference.model.encoder import load_encoder, sentence_embeddings
from conveyor.inference.model.loader import Shard
from conveyor.topology import Layout, Topology

SENTENCES = [
    "Pipelines keep every stage busy.",
    "A tensor-parallel rank holds a slice of each layer.",
    "short",
]


def batch(model_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def main(model_dir: str, out: str) -> None:
    info = init_distributed(device="cpu")
    topo = Topology(Layout(1, 1, info.world_size))
    model = load_encoder(
        model_dir, shard=Shard(topo.tp_rank, info.world_size), tensor_group=topo.tensor_group
    )
    emb = sentence_embeddings(model, *batch(model_dir))
    if info.rank == 0:
        torch.save(emb, out)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # as conveyor.rank does: the interpreter's teardown of a gloo group can abort a finished rank
    # ("terminate called without an active exception", seen 1 run in 10)
    from conveyor.rank import exit_now

    exit_now(0)
