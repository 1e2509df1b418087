"""Automatic tensor parallelism for a user's built HF model (DeepSpeed's ``init_inference``)."""

from conveyor.autotp.engine import InferenceEngine, init_inference, plan_model
from conveyor.autotp.plan import AutoTPError, Plan

__all__ = ["AutoTPError", "InferenceEngine", "Plan", "init_inference", "plan_model"]
