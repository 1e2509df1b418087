"""Training progress as a team reads it: step, loss, tokens/s and MFU, in the log and the metrics.

MFU counts the model's FLOPs per token as PaLM does (appendix B): 6 x parameters for the weights'
forward and backward, plus 12 x layers x heads x head_dim x sequence length for attention; recomputed
activations do not count. The peak is the GPU's dense bf16 (or fp32) rate from its name; on the CPU or
an unknown GPU MFU is not reported (None) rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from conveyor import metrics
from conveyor.inference.model.families import Arch
from conveyor.log import get_logger

log = get_logger("conveyor.train")

# GPU name fragment -> (bf16 dense, fp32 non-tensor) peak FLOP/s, from the vendors' data sheets (SXM).
PEAK_FLOPS = {
    "H200": (989e12, 67e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12),
}


def peak_flops(device: torch.device, bf16: bool) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (half, single) in PEAK_FLOPS.items():
        if fragment in name:
            return half if bf16 else single
    return None


def flops_per_token(arch: Arch, parameters: int, seq_length: int) -> float:
    return 6.0 * parameters + 12.0 * arch.layers * arch.heads * arch.head_dim * seq_length


@dataclass
class Progress:
    job: str
    tokens_per_step: int  # global batch x sequence length
    flops_per_token: float
    peak_per_gpu: float | None
    gpus: int
    is_logger: bool

    def step(
        self, step: int, loss: float, seconds: float, lr: float, grad_norm: float | None
    ) -> dict[str, float | None]:
        tokens_per_second = self.tokens_per_step / seconds if seconds > 0 else 0.0
        mfu = None
        if self.peak_per_gpu:
            mfu = tokens_per_second * self.flops_per_token / (self.peak_per_gpu * self.gpus)
            metrics.TRAIN_MFU.labels(self.job).set(mfu)
        metrics.TRAIN_TOKENS_PER_SECOND.labels(self.job).set(tokens_per_second)
        stats: dict[str, float | None] = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_second": round(tokens_per_second, 1),
            "mfu": None if mfu is None else round(mfu, 4),
            "step_seconds": round(seconds, 4),
        }
        if self.is_logger:
            log.info("fine-tune step", extra=stats)
        return stats
