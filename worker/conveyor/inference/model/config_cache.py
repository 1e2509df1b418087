"""HF configs resolved once and kept with the compile cache.

``AutoConfig`` imports the family's config class, and that import pulls in transformers' model
registry and generation utilities: 2.6 s on a laptop-class CPU and 4.6 s on an H200 host, in every rank
and in the pre-flight, the largest lap of a warm worker start after torch's own import. What the
family's class adds to ``config.json`` is its defaults, so the resolved config (``to_dict()``) is kept
as JSON and read back as plain attributes (``ResolvedConfig``): a warm start imports no transformers at all
(its package import alone is 3.3 s on an H200 host).

Keyed by the bytes of ``config.json`` and the transformers version (defaults change between versions);
nothing else of the directory matters. A family's attribute aliases (GPT-2's ``hidden_size`` for
``n_embd``) live on its class, not in ``to_dict()``, so they are stored and set as plain attributes.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from conveyor.inference.progress import write_json_atomic

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class ResolvedConfig(SimpleNamespace):
    """A resolved config read back from the cache: its values (and the family's aliases) as attributes,
    which is all ``Arch`` and the loaders read."""


def pretrained(config: Any) -> PretrainedConfig:
    """transformers' own object, for the code that needs one (rope scaling's init functions)."""
    if not isinstance(config, ResolvedConfig):
        return config
    from transformers import PretrainedConfig

    return PretrainedConfig(**vars(config))


_resolved: dict[str, Any] = {}  # a process reads each config once (ranks ask twice)


def cache_key(config_json: bytes) -> str:
    return hashlib.sha256(config_json + b"\0transformers " + version("transformers").encode()).hexdigest()[
        :32
    ]


def _from_record(record: dict[str, Any]) -> ResolvedConfig:
    values = dict(record["config"])
    if not isinstance(values.get("model_type"), str):
        raise ValueError("no model_type")
    for alias, name in record.get("aliases", {}).items():
        if name in values:
            values.setdefault(alias, values[name])
    return ResolvedConfig(**values)


def _read(path: Path) -> ResolvedConfig | None:
    try:
        return _from_record(json.loads(path.read_text()))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None  # none yet, or unreadable: resolved again (never trusted half-written)


def resolved_config(model_dir: str | Path, cache_dir: Path | None = None) -> Any:
    """``model_dir``'s config with its family's defaults; from ``cache_dir/configs`` when an earlier run
    resolved the same ``config.json`` with the same transformers (None: no cache on disk)."""
    key = cache_key((Path(model_dir) / "config.json").read_bytes())
    if key in _resolved:
        return _resolved[key]
    path = cache_dir / "configs" / f"{key}.json" if cache_dir is not None else None
    config = _read(path) if path is not None else None
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        if path is not None:
            record = {
                "config": json.loads(config.to_json_string(use_diff=False)),
                "aliases": dict(getattr(type(config), "attribute_map", {})),
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, record)
    _resolved[key] = config
    return config
