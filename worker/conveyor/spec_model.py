"""The pydantic base of the PipelineJob API's models (``spec.py``, ``train_spec.py``): camelCase on the
wire, snake_case in Python, unknown fields refused, defaults validated like given values."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class SpecModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )
