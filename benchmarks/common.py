"""What the benchmarks share: the model shapes they build (through the test models' config builder, so a
family's HF config is spelled in one place) and where a report's JSON goes.

The scripts put worker/ and the repository root on ``sys.path`` before importing this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conveyor.testing.tiny import Shape, hf_config

SHAPES: dict[str, Shape] = {
    "llama2-7b": Shape(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000, positions=4096),
    "llama2-13b": Shape(hidden=5120, intermediate=13824, layers=40, heads=40, vocab=32000, positions=4096),
    # about 1.1B parameters: a training run of both engines fits one GPU (a quick check before a 7B call)
    "llama-1b": Shape(hidden=2048, intermediate=5504, layers=16, heads=16, vocab=32000, positions=4096),
    "tiny": Shape(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=256, positions=512),
}


def llama_config(shape: str) -> Any:
    """The HF Llama config of a named shape, with HF's initializer range (0.02): the quantization error is
    measured on weights of a trained model's scale, not the test models' large ones."""
    return hf_config("llama", SHAPES[shape], initializer_range=0.02)


def save_report(report: dict[str, Any], out: str | Path) -> None:
    """Write ``report`` as indented JSON to ``out``, creating its folder."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
