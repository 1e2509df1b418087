"""Conveyor: pipeline and tensor parallelism for models too large for one GPU.

The engine is usable without Kubernetes, like ``deepspeed``::

    import conveyor
    engine, optimizer, _, _ = conveyor.initialize(model=net, config=cfg)

Heavy submodules (torch) load lazily so that ``conveyor.spec`` and the operator stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it; resolved on first access (PEP 562).
_LAZY = {
    "init_distributed": "conveyor.distributed",
    "initialize": "conveyor.pipe.initialization",
    "add_config_arguments": "conveyor.pipe.config",
    "PipelineEngine": "conveyor.pipe.engine",
    "DataParallelEngine": "conveyor.pipe.data_parallel_engine",
    "pipe": "conveyor.pipe",
    "utils": "conveyor.utils",
    "init_inference": "conveyor.autotp",
    "autotp": "conveyor.autotp",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'conveyor' has no attribute {name!r}")
    mod = importlib.import_module(module)
    return mod if module.endswith("." + name) else getattr(mod, name)


__all__ = ["__version__", *_LAZY]
