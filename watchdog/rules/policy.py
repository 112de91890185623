"""What a firing rule asks the trainer to do: its ``on_fire`` steps.

Each step is one command (the wire schema's action and its parameters) plus when to
take it: ``after`` the previous step (or the alert firing) while the rule's condition
still holds — escalation — and, for the last step, ``repeat`` while it keeps holding.
Waits are durations (``10s``) or optimizer steps (``50 steps``).

    on_fire:
      - {action: enable_clipping, mode: global_norm, threshold: auto}
      - {action: lower_lr, factor: 0.5, after: 10s}

A step that makes a lasting change (``lower_lr``, ``enable_clipping``, ``rollback``,
``stop``) is taken only on evidence that the run is being harmed
(:mod:`gradwatch.watchdog.judgement`); ``requires: none`` takes it on the alert alone
(for a rule whose condition is harm itself, e.g. repeated non-finite steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from gradwatch.watchdog.durations import Span, SpanField
from gradwatch.watchdog.judgement import LASTING_ACTIONS
from gradwatch.watchdog.schema import Action

_ACTION = TypeAdapter(Action)
_TIMING = ("after", "repeat", "requires")

RemediationMode = Literal["enforce", "observe"]
"""``enforce``: commands are issued; ``observe``: decided, audited and notified ("would apply"), never sent."""


class PolicyStep(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: Action
    after: SpanField = Field(Span(), description="Wait this long after the previous step while the condition holds.")
    repeat: SpanField = Field(Span(), description="Last step only: take it again every `repeat` while the condition holds.")
    requires: Literal["harm", "none"] | None = Field(
        None, description="`harm`: only on evidence the run is harmed (the default for lasting actions); `none`: on the alert alone."
    )

    @property
    def needs_evidence(self) -> bool:
        if self.requires is not None:
            return self.requires == "harm"
        return self.spec.action in LASTING_ACTIONS

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


@dataclass(frozen=True)
class Policy:
    """A rule's steps and its remediation mode (None: the service's)."""

    steps: list[PolicyStep]
    mode: RemediationMode | None = None
