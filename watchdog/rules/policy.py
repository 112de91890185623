"""What a firing rule asks the trainer to do: its ``on_fire`` steps.

Each step is one command (the wire schema's action and its parameters) plus when to
take it: ``after`` the previous step (or the alert firing) while the rule's condition
still holds — escalation — and, for the last step, ``repeat`` while it keeps holding.

    on_fire:
      - {action: enable_clipping, mode: global_norm, threshold: auto}
      - {action: lower_lr, factor: 0.5, after: 10s}
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from gradwatch.watchdog.durations import Duration
from gradwatch.watchdog.schema import Action

_ACTION = TypeAdapter(Action)
_TIMING = ("after", "repeat")


class PolicyStep(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: Action
    after: Duration = Field(0.0, description="Wait this long after the previous step while the condition holds.")
    repeat: Duration = Field(0.0, description="Last step only: take it again every `repeat` while the condition holds.")

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        """YAML writes a step flat (`{action: lower_lr, factor: 0.5, after: 10s}`)."""
        if not isinstance(data, dict) or "spec" in data:
            return data
        timing = {k: data[k] for k in _TIMING if k in data}
        action = {k: v for k, v in data.items() if k not in _TIMING}
        try:
            spec = _ACTION.validate_python(action)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"][1:]) or "action"
            raise ValueError(f"{where}: {first['msg']}") from None
        return {"spec": spec, **timing}
