"""Train a tiny causal transformer with 2 pipeline stages: a DeepSpeed pipeline script with Conveyor
imports. Run it with ``conveyor run deploy/examples/train-tiny-transformer.yaml``.

The task (predict the next number of a counting sequence) is learnable in a few dozen steps, so the
falling loss in the log shows that the pipeline trains. A restart resumes from the latest committed
checkpoint and skips the data already seen; a restart after completion exits at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import conveyor
from conveyor.distributed import destroy_distributed
from conveyor.log import configure, get_logger
from conveyor.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from conveyor.pipe.script import TrainSettings
from conveyor.utils import RepeatingLoader

VOCAB, DIM, HEADS, LAYERS, SEQ = 32, 32, 4, 4, 16

DEFAULT_CONFIG = {
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 4,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 3e-3, "warmup_num_steps": 5}},
    "gradient_clipping": 1.0,
    "steps_per_print": 5,
    "pipeline": {"schedule": "1f1b"},
}


class Counting(Dataset):
    """Sequence i counts up from i mod VOCAB; the label is the next number."""

    def __len__(self) -> int:
        return 4096

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        seq = (torch.arange(SEQ + 1) + i) % VOCAB
        return seq[:-1], seq[1:]


class AddPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(SEQ, DIM) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos  # [B, S, D]


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, s, HEADS, d // HEADS).transpose(1, 2) for t in (q, k, v))  # (B, H, S, hd)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))  # (B, S, D)
        return x + self.mlp(self.ln2(x))


def logits(embedding: nn.Embedding, x: torch.Tensor) -> torch.Tensor:
    return x @ embedding.weight.t()  # [B, S, D] @ [D, V] -> [B, S, V]


def loss_fn(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, VOCAB).float(), labels.reshape(-1))  # (B*S, V)


def layers() -> list:
    return [
        TiedLayerSpec("embed", nn.Embedding, VOCAB, DIM),
        LayerSpec(AddPositions),
        *[LayerSpec(Block) for _ in range(LAYERS)],
        LayerSpec(nn.LayerNorm, DIM),
        TiedLayerSpec("embed", nn.Embedding, VOCAB, DIM, forward_fn=logits),
    ]


def main() -> int:
    settings = TrainSettings.from_environ(default_steps=40, default_config=DEFAULT_CONFIG, default_stages=2)
    info = conveyor.init_distributed()
    configure(job=settings.job, rank=info.rank)
    log = get_logger("train_tiny_transformer")
    net = PipelineModule(layers(), num_stages=settings.stages, loss_fn=loss_fn, partition_method="type:Block")
    engine, _, _, _ = conveyor.initialize(model=net, config=settings.config, job=settings.job)
    if settings.checkpoint_dir is not None:
        engine.load_checkpoint(settings.checkpoint_dir)
    if engine.global_steps >= settings.steps:
        log.info("job already complete", extra={"step": engine.global_steps})
        settings.finish(completed=True)
        destroy_distributed()
        return 0

    data = None
    if engine.is_first_stage() or engine.is_last_stage():
        layout = engine.topology.layout
        sampler = DistributedSampler(Counting(), layout.replicas, engine.topology.replica, shuffle=False)
        data = RepeatingLoader(DataLoader(Counting(), batch_size=engine.micro_batch_size, sampler=sampler))
        for _ in range(engine.global_steps * engine.micro_batches):  # skip what the checkpoint has seen
            next(data)
    while engine.global_steps < settings.steps:
        engine.train_batch(data)
        at_save_point = engine.global_steps % settings.checkpoint_every == 0
        if settings.checkpoint_dir is not None and (at_save_point or engine.global_steps == settings.steps):
            engine.save_checkpoint(settings.checkpoint_dir, keep=settings.checkpoint_keep)
    settings.finish(completed=True)
    destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
