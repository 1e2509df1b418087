"""Turning pydantic's ValidationError into the message a user reads: one line per problem, each naming
the field by its wire path (``spec.parallelism.stages``) and what to do about it."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError


class SpecError(ValueError):
    """A PipelineJob that does not validate; ``str()`` is a user-facing message, one line per problem."""


def _format_location(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("function-after", "function-before") or str(item).startswith("function-"):
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        where = _format_location(tuple(e["loc"]))
        where = f"{prefix}.{where}" if prefix and where else (prefix or where)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field; remove it (check its spelling against `kubectl explain pipelinejob.spec`)"
        elif e["type"] == "missing":
            msg = "required field is missing; add it"
        elif "input" in e and e["type"] not in ("value_error", "assertion_error"):
            msg = f"{msg} (got {json.dumps(e['input'], default=str)})"
        # A model validator's message that names its own fields (`spec.masterPort ...`) needs no `spec: `.
        named = msg.startswith((f"{where}.", f"{where}["))
        lines.append(f"{where}: {msg}" if where and not named else msg)
    return "\n".join(lines)
