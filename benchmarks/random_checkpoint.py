"""A random-weight HF checkpoint of any config, written shard by shard: each tensor is drawn on the GPU
(or the CPU) and only one shard is ever held in host memory, so a 13B checkpoint (26 GB in bf16) needs
neither a 26 GB host buffer nor a download. Layout as ``save_pretrained`` writes it: config.json,
``model-0000i-of-0000n.safetensors``, ``model.safetensors.index.json`` (written last: a folder that has
it is complete and is reused)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

INDEX = "model.safetensors.index.json"


def _same_shape(config: Any, saved: dict[str, Any]) -> list[str]:
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")  # fmt: skip
    mine = config.to_dict()
    return [f"{k}: {saved.get(k)} != {mine.get(k)}" for k in keys if saved.get(k) != mine.get(k)]


def ensure_checkpoint(
    config: Any, folder: str | Path, dtype: torch.dtype, device: torch.device, shard_bytes: int = 4 << 30
) -> dict[str, Any]:
    """Write a seeded random checkpoint of ``config`` to ``folder`` unless a complete one of the same shape
    is there; returns what was done and how long it took."""
    import transformers
    from safetensors.torch import save_file

    out = Path(folder)
    if (out / INDEX).exists():
        saved = json.loads((out / "config.json").read_text())
        if diff := _same_shape(config, saved):
            raise SystemExit(
                f"--ckpt-dir {out} holds another model ({'; '.join(diff)}); pass an empty folder"
            )
        return {"written": False, "folder": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with torch.device("meta"):
        shapes = {
            n: t.shape for n, t in transformers.AutoModelForCausalLM.from_config(config).state_dict().items()
        }
    gen = torch.Generator(device=device).manual_seed(0)
    std = float(getattr(config, "initializer_range", 0.02))
    shards: list[list[str]] = [[]]
    sizes = [0]
    for name, shape in shapes.items():  # plan the shards first: the file names carry their count
        nbytes = shape.numel() * torch.empty((), dtype=dtype).element_size()
        if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
            shards.append([])
            sizes.append(0)
        shards[-1].append(name)
        sizes[-1] += nbytes
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                t = torch.ones(shapes[name], dtype=dtype)
            else:  # drawn where it is fast, held on the host one shard at a time
                t = (torch.randn(shapes[name], generator=gen, device=device, dtype=torch.float32) * std).to(
                    dtype
                )
            tensors[name] = t.cpu()
            weight_map[name] = file
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
    config.save_pretrained(out)
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2))  # last: marks the folder complete
    return {"written": True, "folder": str(out), "bytes": sum(sizes), "files": len(shards),
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
