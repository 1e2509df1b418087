"""The fine-tuning data: a JSONL file turned into fixed-length samples, read in a deterministic order.

Each line is ``{"text": ...}`` (tokenized with the model's tokenizer) or ``{"input_ids": [...]}``.
Packed (the default), documents are joined with EOS between them and cut into ``seq_length`` samples
(the tail shorter than that is dropped); unpacked, each document is one sample, truncated or padded, its
padding labelled -100 so that the loss leaves it out.

The order is a permutation of the samples per epoch, seeded by ``seed + epoch``; the *position* (samples
consumed so far) says where the stream is, so a resumed run continues exactly where the checkpoint was
taken. Step k's global batch is the ``global_batch`` samples from its position on; replica r takes the
r-th contiguous slice of it, cut into micro-batches in order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FIELD = "spec.train.dataset"


class DatasetError(ValueError):
    """The dataset cannot be read; the message names the field and the line."""


@dataclass(frozen=True)
class Samples:
    inputs: torch.Tensor  # [N, S] token ids
    labels: torch.Tensor  # [N, S] token ids, -100 where padded

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def _documents(path: Path, tokenizer: Any) -> list[tuple[int, list[int]]]:
    """(line number, token ids) of each document."""
    if not path.is_file():
        raise DatasetError(f"{FIELD}: {path} does not exist")
    docs: list[tuple[int, list[int]]] = []
    with open(path, "rb") as f:  # decoded a line at a time: a bad byte's error names its line
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DatasetError(
                    f"{FIELD}: {path} line {number} is not UTF-8 ({err.reason} at byte {err.start}): "
                    "save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{FIELD}: {path} line {number} is not JSON ({err})") from None
            if isinstance(row, dict) and isinstance(row.get("input_ids"), list):
                ids = row["input_ids"]
                # (JSON's true is a Python int: not a token id)
                if not all(type(t) is int and t >= 0 for t in ids):
                    raise DatasetError(
                        f"{FIELD}: {path} line {number}: input_ids must be token ids (ints >= 0)"
                    )
                docs.append((number, ids))
            elif isinstance(row, dict) and isinstance(row.get("text"), str):
                if tokenizer is None:
                    raise DatasetError(
                        f"{FIELD}: {path} line {number} has text but the model directory has no tokenizer: "
                        "add the tokenizer's files to spec.model.path or give input_ids"
                    )
                docs.append((number, list(tokenizer(row["text"], add_special_tokens=True)["input_ids"])))
            else:
                raise DatasetError(
                    f"{FIELD}: {path} line {number}: expected an object with text or input_ids"
                )
    if not docs:
        raise DatasetError(f"{FIELD}: {path} has no documents")
    return docs


def read_samples(
    path: str | Path,
    seq_length: int,
    packing: bool,
    tokenizer: Any = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    vocab_size: int | None = None,
) -> Samples:
    numbered = _documents(Path(path), tokenizer)
    for number, doc in numbered:
        if vocab_size is not None and doc and max(doc) >= vocab_size:
            raise DatasetError(
                f"{FIELD}: {path} line {number}: token id {max(doc)} is outside the model's vocabulary "
                f"of {vocab_size}"
            )
        if not packing and len(doc) < 2:
            # its sample would hold no label (a token predicts the next): a micro-batch of such samples
            # has a loss of 0/0, NaN, and the run trains on nothing without failing
            raise DatasetError(
                f"{FIELD}: {path} line {number} has {len(doc)} token(s); with spec.train.packing false each "
                "document is one sample and needs at least 2: remove the line or set packing: true"
            )
    docs = [doc for _, doc in numbered]
    if packing:
        stream: list[int] = []
        for doc in docs:
            stream += doc + ([eos_id] if eos_id is not None and (not doc or doc[-1] != eos_id) else [])
        count = len(stream) // seq_length
        if count == 0:
            raise DatasetError(
                f"{FIELD}: {len(stream)} tokens in all, fewer than one sequence of seqLength {seq_length}: "
                "add data or lower spec.train.seqLength"
            )
        inputs = torch.tensor(stream[: count * seq_length], dtype=torch.long).view(count, seq_length)
        return Samples(inputs, inputs.clone())
    inputs = torch.full((len(docs), seq_length), pad_id, dtype=torch.long)
    labels = torch.full((len(docs), seq_length), -100, dtype=torch.long)
    for i, doc in enumerate(docs):
        ids = torch.tensor(doc[:seq_length], dtype=torch.long)
        inputs[i, : len(ids)] = ids
        labels[i, : len(ids)] = ids
    return Samples(inputs, labels)


class DataOrder:
    """Which samples step k's micro-batches hold, for every replica, from a position in the stream."""

    def __init__(self, samples: Samples, seed: int, global_batch: int, replicas: int, micro_batch: int):
        if global_batch % (replicas * micro_batch):
            raise DatasetError(
                f"global batch {global_batch} is not a multiple of {replicas} replicas x micro-batch {micro_batch}"
            )
        self.samples, self.seed = samples, seed
        self.global_batch, self.replicas, self.micro_batch = global_batch, replicas, micro_batch
        self._epoch: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._epoch is None or self._epoch[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch = (epoch, torch.randperm(len(self.samples), generator=generator))
        return self._epoch[1]

    def indices(self, position: int, count: int) -> list[int]:
        """Sample indices at stream positions [position, position + count)."""
        n = len(self.samples)
        return [int(self._permutation(p // n)[p % n]) for p in range(position, position + count)]

    def micro_batches(self, position: int, replica: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, labels) [micro_batch, S] of each micro-batch of ``replica`` in the step at ``position``."""
        share = self.global_batch // self.replicas
        mine = self.indices(position + replica * share, share)
        out = []
        for start in range(0, share, self.micro_batch):
            index = torch.tensor(mine[start : start + self.micro_batch])
            out.append((self.samples.inputs[index], self.samples.labels[index]))
        return out
