"""The rules file as pydantic models: what a rule may say, checked when it is loaded.

A rules file is ``{rules: [rule, ...]}``; each rule is one of seven kinds, chosen by
its ``kind`` key. Unknown keys, wrong types, bad durations, bad regexes, bad
templates, ``lo >= hi`` and duplicate names are refused here, so a file that loads
can always be evaluated. :mod:`.conditions` gives each kind's exact semantics.

Durations are Prometheus durations (``30s``, ``5m``, ``1h30m``, ``0``), held as
seconds; :func:`format_duration` writes them back.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from gradwatch.watchdog import metric_names as mn
from gradwatch.watchdog.durations import Duration, PositiveDuration, format_duration, parse_duration  # noqa: F401
from gradwatch.watchdog.alerting import TemplateError, compile_template
from gradwatch.watchdog.rules.policy import PolicyStep, RemediationMode


def _bad(message: str, at: tuple = ()) -> PydanticCustomError:
    """A validation error with a finished message; ``at`` is the path below the failing model (for locations)."""
    return PydanticCustomError("rule_invalid", message, {"at": at})


# --- shared field types ------------------------------------------------------------------

LABEL_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
METRIC_NAME = r"^[A-Za-z_:][A-Za-z0-9_:]*$"
RULE_NAME = r"^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$"
WEIGHTS = r".*weight"
"""Default layer pattern: weight tensors only. Bias ratios are meaningless (biases are
often zero-initialised, so mean|w| is 0) and biases are not what vanishes or explodes."""

MetricName = Annotated[str, Field(pattern=METRIC_NAME)]
Matchers = dict[Annotated[str, Field(pattern=LABEL_NAME)], str]


def _check_regex(pattern: Any) -> Any:
    if not isinstance(pattern, str):
        return pattern  # the str check that follows reports it
    try:
        re.compile(pattern)
    except re.error as exc:
        raise _bad(f"invalid regular expression {pattern!r}: {exc}") from None
    return pattern


Regex = Annotated[str, BeforeValidator(_check_regex)]


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True, allow_inf_nan=False
    )


class Selector(_Strict):
    """One metric with optional label-equality matchers.

    E.g. ``{metric: gradwatch_skipped_steps_total, match: {reason: nonfinite}}``.
    """

    metric: MetricName
    match: Matchers = Field(default_factory=dict)


# --- rules -----------------------------------------------------------------------------------


class _RuleBase(_Strict):
    name: str = Field(pattern=RULE_NAME, description="Alert name (the `alertname` label); unique in the file.")
    for_: Duration = Field(0.0, alias="for", description="How long the condition must hold before the alert fires.")
    keep_firing_for: Duration = Field(
        0.0, description="How long a firing alert keeps firing after its condition clears."
    )
    labels: dict[Annotated[str, Field(pattern=LABEL_NAME)], str] = Field(
        default_factory=dict, description="Added to every alert (e.g. severity); override series labels."
    )
    annotations: dict[Annotated[str, Field(pattern=LABEL_NAME)], str] = Field(
        default_factory=dict, description="Alert text; may use {{ $labels.NAME }} and {{ $value }}."
    )
    match: Matchers = Field(default_factory=dict, description="Label equality matchers applied to every series read.")
    limit: int = Field(0, ge=0, description="Most active alerts of this rule; more fails the evaluation. 0: no limit.")
    on_fire: list[PolicyStep] = Field(
        default_factory=list, description="Remediation steps while the alert fires (see rules/policy.py); empty: notify only."
    )
    remediation: RemediationMode | None = Field(
        None, description="`observe`: decide, audit and notify what on_fire would do, send nothing; null: the service's mode."
    )

    @field_validator("on_fire")
    @classmethod
    def _repeat_only_last(cls, steps: list) -> list:
        for i, step in enumerate(steps[:-1]):
            if step.repeat:
                raise _bad("only the last step may repeat", at=(i, "repeat"))
        return steps

    @field_validator("labels")
    @classmethod
    def _no_reserved_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key in labels:
            if key == "alertname" or key.startswith("__"):
                raise _bad(f"label {key!r} is reserved", at=(key,))
        return labels

    @field_validator("annotations")
    @classmethod
    def _templates_parse(cls, annotations: dict[str, str]) -> dict[str, str]:
        for key, text in annotations.items():
            try:
                compile_template(text)
            except TemplateError as exc:
                raise _bad(str(exc), at=(key,)) from None
        return annotations


class ThresholdRule(_RuleBase):
    """Latest value of each series above/below ``value``. PromQL: ``metric{match} > value`` (NaN never matches)."""

    kind: Literal["threshold"]
    metric: MetricName
    op: Literal["above", "below"]
    value: float


class NonFiniteRule(_RuleBase):
    """Any new NaN/Inf event: a counter increased within ``window``, or a gauge is NaN or ±Inf now.

    PromQL, operands joined with ``or`` in this order (first one wins a label set)::

        increase(C[window]) > min_increase                        # each counter C
        or ((C > 0 unless C offset window) and on(run, rank) (ANCHOR offset window))
        or (G != G or G == +Inf or G == -Inf)                     # each gauge G

    The middle line catches a counter series *created* by its first event (exported
    already at 1, so ``increase`` sees no rise), while the run's ``anchor`` series
    proves the run was watched before — so a watchdog restart does not alert on old
    counts. With ``by`` each operand is ``sum by (by) (...)``: one alert per run/rank
    instead of one per layer.
    """

    kind: Literal["nonfinite"]
    counters: list[Selector] = Field(
        default_factory=lambda: [
            Selector(metric=mn.SKIPPED_STEPS_TOTAL, match={"reason": "nonfinite"}),
            Selector(metric=mn.NONFINITE_GRADS_TOTAL),
        ]
    )
    gauges: list[Selector] = Field(
        default_factory=lambda: [
            Selector(metric=mn.LOSS),
            Selector(metric=mn.GRAD_GLOBAL_NORM),
            Selector(metric=mn.GRAD_GLOBAL_NORM_MAX),
        ]
    )
    window: PositiveDuration = Field(60.0, description="How far back a counter increase counts as new.")
    anchor: MetricName | None = Field(
        mn.STEP,
        description="Series (same run, rank) showing the run was watched `window` ago; null: only increase().",
    )
    by: list[Annotated[str, Field(pattern=LABEL_NAME)]] | None = Field(
        None, description="Aggregate each operand by these labels (e.g. [run, rank]); null: one alert per series."
    )
    min_increase: float = Field(
        0.0, ge=0, description="A counter operand counts only when it rose by more than this (e.g. 2.5: three or more events; not 2, since PromQL's increase() extrapolates between scrapes)."
    )

    @model_validator(mode="after")
    def _something_to_watch(self) -> NonFiniteRule:
        if not self.counters and not self.gauges:
            raise _bad("needs at least one counter or gauge", at=("counters",))
        return self


class BandRule(_RuleBase):
    """log10 of each layer's latest value outside ``[lo, hi]`` (the DL4J update-ratio band by default).

    PromQL: ``log10(metric{layer=~"P"}) > hi`` (side above), ``< lo`` (below), or both
    joined with ``or``. ``layer_pattern`` is fully anchored, like ``=~``.
    """

    kind: Literal["band"]
    metric: MetricName = mn.UPDATE_RATIO
    lo: float = -4.0
    hi: float = -2.0
    side: Literal["both", "above", "below"] = "both"
    layer_pattern: Regex = WEIGHTS

    @model_validator(mode="after")
    def _ordered(self) -> BandRule:
        if self.lo >= self.hi:
            raise _bad(f"lo ({self.lo:g}) must be below hi ({self.hi:g})", at=("hi",))
        return self


class SpikeRule(_RuleBase):
    """The latest value against its own recent window ``(now - window, now]``.

    * ``mode: ratio`` — value / mean of the window's *earlier* points ≥ ``factor``
      (and that mean > 0). The current point is excluded so a spike cannot dilute its
      own reference. PromQL: ``x / M >= factor and M > 0`` with
      ``M = (sum_over_time(x[w]) - x) / (count_over_time(x[w]) - 1)`` (x is the last point).
    * ``mode: zscore`` — ``(x - avg_over_time(x[w])) / stddev_over_time(x[w]) >= z``, the
      current point *included*, exactly as PromQL computes it (population stddev). An
      outlier among n points reaches at most z = sqrt(n - 1), so the window must hold
      more than z² + 1 points.

    Both need ``count_over_time(x[w]) >= min_samples``. The alert value is the ratio or z.
    """

    kind: Literal["spike"]
    metric: MetricName
    mode: Literal["ratio", "zscore"] = "ratio"
    window: PositiveDuration
    factor: float | None = Field(None, gt=1, description="ratio mode: how many times the window mean.")
    z: float | None = Field(None, gt=0, description="zscore mode: how many standard deviations.")
    min_samples: int = Field(10, ge=2, description="Points in the window (current included) before it can fire.")

    @model_validator(mode="after")
    def _mode_parameter(self) -> SpikeRule:
        need, other = ("factor", "z") if self.mode == "ratio" else ("z", "factor")
        if getattr(self, need) is None:
            raise _bad(f"mode {self.mode} needs {need}", at=(need,))
        if getattr(self, other) is not None:
            raise _bad(f"{other} is not used by mode {self.mode}", at=(other,))
        return self


class DepthRule(_RuleBase):
    """Vanishing gradients across depth: log10(metric of the shallowest layer / of the deepest) < ``bound``.

    Per group of series that differ only in ``layer`` (i.e. per run and rank), among
    layers matching ``layer_pattern`` whose latest ``metric`` is finite and > 0 and that
    have a ``depth_metric``. Alert labels add ``first_layer`` and ``last_layer``.
    No PromQL equivalent (needs argmin/argmax over depth).
    """

    kind: Literal["depth"]
    metric: MetricName = mn.GRAD_ABS_MEAN
    depth_metric: MetricName = mn.LAYER_DEPTH
    layer_pattern: Regex = WEIGHTS
    bound: float = Field(-6.0, lt=0, description="log10 of first/last below this fires (-6: a million times smaller).")


class PlateauRule(_RuleBase):
    """Training stopped moving: the loss is flat over ``window`` while every layer's update ratio is tiny.

    Flat: ``(max - min) / |mean| < rel_range`` over the window's points (at least
    ``min_samples``); tiny: the largest latest ``ratio_metric`` among layers matching
    ``layer_pattern`` (same run and rank) is below ``max_update_ratio``. The alert value
    is the relative range.
    """

    kind: Literal["plateau"]
    metric: MetricName = mn.LOSS
    window: PositiveDuration = 600.0
    rel_range: float = Field(0.01, gt=0)
    ratio_metric: MetricName = mn.UPDATE_RATIO
    layer_pattern: Regex = WEIGHTS
    max_update_ratio: float = Field(1e-6, gt=0)
    min_samples: int = Field(30, ge=2)


class StallRule(_RuleBase):
    """No step progress, per series of ``metric`` (one per run and rank).

    Fires when the step did not change over ``window`` although the series was already
    there ``window`` ago (PromQL ``changes(x[w]) == 0 and x offset w``), or — with
    ``stale`` — when the series has no point in the last ``window`` but one within
    ``forget_after`` (the scrape went silent). The alert value is the last step seen.
    """

    kind: Literal["stall"]
    metric: MetricName = mn.STEP
    window: PositiveDuration = 600.0
    stale: bool = True
    forget_after: PositiveDuration = 3600.0

    @model_validator(mode="after")
    def _forget_after_window(self) -> StallRule:
        if self.stale and self.forget_after <= self.window:
            raise _bad("forget_after must be longer than window", at=("forget_after",))
        return self


Rule = Annotated[
    Union[ThresholdRule, NonFiniteRule, BandRule, SpikeRule, DepthRule, PlateauRule, StallRule],
    Field(discriminator="kind"),
]
RULE_MODELS: dict[str, type[_RuleBase]] = {
    "threshold": ThresholdRule,
    "nonfinite": NonFiniteRule,
    "band": BandRule,
    "spike": SpikeRule,
    "depth": DepthRule,
    "plateau": PlateauRule,
    "stall": StallRule,
}
"""Each ``kind`` and its model (for messages such as the keys a kind allows)."""


class RulesFile(_Strict):
    """A whole rules file: ``rules:`` is a list of rules with unique names."""

    rules: list[Rule]

    @model_validator(mode="after")
    def _unique_names(self) -> RulesFile:
        first: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            if rule.name in first:
                reason = f"duplicate rule name {rule.name!r} (first used by rules[{first[rule.name]}])"
                raise _bad(reason, at=("rules", i, "name"))
            first[rule.name] = i
        return self

