"""``spec.train``: how a train job trains (the API part), one of three ways: fine-tune ``spec.model`` on a
dataset with the built-in loop (``conveyor.train``), run the user's DeepSpeed-style script in every rank
(``conveyor.pipe``), or run the user's command in every rank.

Its defaults are compared against, not only read: a fine-tuning field set with a script is refused
(``TrainSpec.check_in_job``, and as CEL in ``admission_rules.py``), since it would do nothing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic.alias_generators import to_camel

from conveyor.kube_formats import KubeObject
from conveyor.spec_model import SpecModel


class OptimizerSpec(SpecModel):
    """An optimizer by DeepSpeed's name; ``params`` are the torch optimizer's arguments (lr, betas, ...)."""

    type: Literal["Adam", "AdamW", "SGD", "Adagrad", "RMSprop"] = Field(
        "AdamW", description="DeepSpeed's optimizer names (`Adam` with weight_decay decouples it, as AdamW)."
    )
    params: KubeObject = Field(
        default_factory=lambda: {"lr": 1e-5}, description="Arguments of the optimizer, e.g. lr, betas."
    )


class SchedulerSpec(SpecModel):
    """A learning-rate schedule by DeepSpeed's name; ``params`` with DeepSpeed's names."""

    type: Literal["WarmupCosineLR", "WarmupLR", "WarmupDecayLR"] = Field(
        "WarmupCosineLR",
        description="`WarmupCosineLR` (warm-up, then cosine to cos_min_ratio); total_num_steps defaults "
        "to train.steps.",
    )
    params: KubeObject = Field(
        default_factory=dict,
        description="e.g. warmup_num_steps, warmup_type, warmup_min_ratio, cos_min_ratio.",
    )


class TrainSpec(SpecModel):
    """Training, one of three ways: fine-tune ``spec.model`` on ``dataset`` (built in), run the user's
    DeepSpeed-style ``script`` in every rank's process, or run the user's ``command`` in every rank."""

    script: str | None = Field(None, description="Python script run by every rank, DeepSpeed style.")
    command: list[str] | None = Field(
        None,
        min_length=1,
        description="A command from the image run by every rank with torchrun's environment (RANK, "
        "WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and Conveyor's own.",
    )
    args: list[str] = Field(default_factory=list, description="Arguments passed to the script or command.")
    steps: int | None = Field(None, ge=1, description="Optimizer steps (exported as CONVEYOR_TRAIN_STEPS).")
    config: KubeObject = Field(
        default_factory=dict, description="DeepSpeed-style engine config, passed as CONVEYOR_TRAIN_CONFIG."
    )
    # ---- fine-tuning spec.model (HF causal LM) on a dataset ----
    dataset: str | None = Field(
        None, description="Fine-tune spec.model on this JSONL: one {text} or {input_ids} object a line."
    )
    seq_length: int = Field(512, ge=2, le=1_048_576, description="Tokens per training sequence.")
    packing: bool = Field(
        True, description="Concatenate documents (EOS between) into full sequences; false: pad each."
    )
    micro_batch_size: int = Field(1, ge=1, le=4096, description="Sequences per micro-batch per replica.")
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="Sequences per optimizer step over all replicas; default microBatchSize x replicas. "
        "Micro-batches per step = globalBatchSize / (microBatchSize x replicas).",
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    scheduler: SchedulerSpec | None = Field(None, description="None: a constant learning rate.")
    gradient_clipping: float = Field(1.0, ge=0.0, description="Max global gradient norm; 0 turns it off.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="`bf16`: bf16 compute with fp32 master weights; `auto`: bf16 on GPUs, fp32 on the CPU.",
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in backward."
    )
    seed: int = Field(0, ge=0, description="Seed of the data order (shuffled per epoch).")
    export: str | None = Field(
        None,
        description="HF directory the trained model is written to at the end (loadable as is); "
        "default: <checkpoint.path>/export.",
    )

    @property
    def fine_tunes(self) -> bool:
        return self.dataset is not None

    def micro_batches(self, replicas: int) -> int:
        return (self.global_batch_size or self.micro_batch_size * replicas) // (
            self.micro_batch_size * replicas
        )

    def check_in_job(self, *, has_model: bool, replicas: int) -> None:
        """The rules between spec.train's fields and the rest of the spec (PipelineJobSpec's validator
        calls this); a ValueError names the field and the fix."""
        ways = [name for name in ("script", "command", "dataset") if getattr(self, name) is not None]
        if len(ways) != 1:
            raise ValueError(
                f"spec.train: set exactly one of script (a DeepSpeed-style script), command (a program every "
                f"rank runs) or dataset (fine-tune spec.model); got {', '.join(ways) or 'none'}"
            )
        # Fields of the other way of training are refused, not ignored: they would do nothing. Compared
        # with their defaults, not by whether they were given: the API server writes defaults in.
        other = {"config", "args"} if self.fine_tunes else set(FINE_TUNING_FIELDS)
        misplaced = sorted(
            name
            for name in other
            if getattr(self, name) != TrainSpec.model_fields[name].get_default(call_default_factory=True)
        )
        if misplaced:
            names = ", ".join(f"spec.train.{to_camel(name)}" for name in misplaced)
            use = "a script or command" if self.fine_tunes else "spec.train.dataset (fine-tuning)"
            raise ValueError(f"{names} only applies to {use}: remove it")
        if not self.fine_tunes:
            return
        if not has_model:
            raise ValueError(
                "spec.model is required with spec.train.dataset: add model.path (an HF directory)"
            )
        if self.steps is None:
            raise ValueError(
                "spec.train.steps is required with spec.train.dataset: add steps (optimizer steps)"
            )
        per_step = self.micro_batch_size * replicas
        if self.global_batch_size is not None and self.global_batch_size % per_step:
            raise ValueError(
                f"spec.train.globalBatchSize ({self.global_batch_size}) is not a multiple of "
                f"microBatchSize ({self.micro_batch_size}) x parallelism.replicas ({replicas}): "
                f"use a multiple of {per_step}"
            )


# TrainSpec's fields that only fine-tuning (spec.train.dataset) reads.
FINE_TUNING_FIELDS = (
    "seq_length", "packing", "micro_batch_size", "global_batch_size", "optimizer", "scheduler",
    "gradient_clipping", "precision", "activation_checkpointing", "seed", "export",
)  # fmt: skip
