"""``spec.failurePolicy``: what a failure of a group's pod does, decided by ordered rules (the API part).

The operator matches a failure against ``rules`` in order, then against the built-in defaults (a
disruption restarts without using the budget; the worker's refusal, exit code 2, fails the job at once),
and otherwise restarts the group counting against ``restartPolicy.backoffLimit``. The matching itself is
``conveyor_operator.failure_rules`` (pure functions).
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from conveyor.kube_formats import MAX_SECONDS

# One element of onExitCodes: a code (`137`) or an inclusive range (`128-255`).
_CODES = re.compile(r"^\s*(\d{1,3})\s*(?:-\s*(\d{1,3})\s*)?$")


class _Spec(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_enum_values=True
    )


class FailureAction(StrEnum):
    RESTART_GROUP = "RestartGroup"  # counts against restartPolicy.backoffLimit
    RESTART_GROUP_NO_COUNT = "RestartGroupNoCount"  # preemption, eviction: the job did nothing wrong
    FAIL_JOB = "FailJob"  # a configuration error: retrying cannot help
    IGNORE = "Ignore"  # neither restart nor count (the pod's own restart is left to the kubelet)


def parse_codes(text: str) -> tuple[int, int]:
    """``"137"`` -> (137, 137); ``"128-255"`` -> (128, 255); anything else names the fix."""
    found = _CODES.match(text)
    if found is None:
        raise ValueError(f"exit code {text!r}: write a code (`137`) or an inclusive range (`128-255`)")
    low = int(found.group(1))
    high = int(found.group(2)) if found.group(2) is not None else low
    if not 0 <= low <= high <= 255:
        raise ValueError(f"exit code range {text!r}: codes are 0-255 and the range's low end comes first")
    return low, high


# The CRD checks an exit code's form with the same pattern (its bounds and order only the model checks);
# json_schema_extra, so that the model's own message (parse_codes) is the one `conveyor run` shows.
ExitCodes = Annotated[str, Field(json_schema_extra={"pattern": _CODES.pattern})]


class FailureRule(_Spec):
    # The API server refuses a rule without a matcher at admission too (the model's message is below).
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "(has(self.onExitCodes) && size(self.onExitCodes) > 0)"
                    " || (has(self.onPodConditions) && size(self.onPodConditions) > 0)"
                    " || (has(self.onReasons) && size(self.onReasons) > 0)",
                    "message": "a failurePolicy rule needs onExitCodes, onPodConditions or onReasons: a rule "
                    "that matches every failure is the default (RestartGroup) already",
                }
            ]
        }
    )

    name: str | None = Field(None, max_length=63, description="Shown in status and Events when it matches.")
    action: FailureAction = Field(description="What a failure this rule matches does.")
    on_exit_codes: list[ExitCodes] | None = Field(
        None,
        max_length=64,
        description="Worker exit codes, each a code (`137`) or an inclusive range (`128-255`).",
    )
    on_pod_conditions: list[str] | None = Field(
        None,
        max_length=16,
        description="Pod condition types that are True on the failed pod (e.g. `DisruptionTarget`).",
    )
    on_reasons: list[str] | None = Field(
        None,
        max_length=16,
        description="Substrings of the cause the worker wrote to its termination message.",
    )

    @field_validator("on_exit_codes")
    @classmethod
    def _codes_parse(cls, codes: list[str] | None) -> list[str] | None:
        for text in codes or []:
            parse_codes(text)
        return codes

    @model_validator(mode="after")
    def _matches_something(self) -> FailureRule:
        if not (self.on_exit_codes or self.on_pod_conditions or self.on_reasons):
            raise ValueError(
                "a failurePolicy rule needs onExitCodes, onPodConditions or onReasons: a rule that matches "
                "every failure is the default (RestartGroup) already"
            )
        return self


class FailurePolicySpec(_Spec):
    rules: list[FailureRule] = Field(
        default_factory=list,
        max_length=32,
        description="Checked in order before the defaults; the first rule that matches decides.",
    )
    hang_timeout_seconds: int | None = Field(
        None,
        ge=10,
        le=MAX_SECONDS,
        description="A rank of an inference or train job without progress this long is hung: its liveness "
        "probe fails and the group restarts (reason Hung). Start-up (loading, compiling) never counts.",
    )
    default_rules: bool = Field(
        True,
        description="Append the defaults: DisruptionTarget restarts without counting; exit 2 (the worker "
        "refused the job) fails it at once.",
    )
