"""Durations as Prometheus writes them (``30s``, ``5m``, ``1h30m``, ``500ms``, ``0``), held as seconds.

One parser for every duration in the watchdog's files (rules, policies, notifiers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, PlainSerializer
from pydantic_core import PydanticCustomError

_DURATION = re.compile(r"(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?")
_UNITS = (
    ("y", 365 * 86400.0), ("w", 7 * 86400.0), ("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 0.001),
)


def parse_duration(value: Any) -> float:
    """A Prometheus duration (``1h30m``, ``2s``, ``500ms``, ``0``) in seconds."""
    if (value == 0 and not isinstance(value, bool)) or value == "0":
        return 0.0
    if isinstance(value, str):
        m = _DURATION.fullmatch(value.strip())
        if m and value.strip() and any(m.groups()):
            return sum(int(g) * unit for g, (_, unit) in zip(m.groups(), _UNITS) if g)
    hint = " (a bare number needs a unit)" if isinstance(value, int | float) and not isinstance(value, bool) else ""
    raise PydanticCustomError("duration", f"invalid duration {value!r}{hint}: use a Prometheus duration like 30s, 5m, 1h30m or 0")


def format_duration(seconds: float) -> str:
    """Seconds as the shortest Prometheus duration (``5400.0`` → ``1h30m``; ``0`` → ``0s``)."""
    ms = round(seconds * 1000)
    if ms == 0:
        return "0s"
    out = []
    for unit, size in _UNITS:
        n, ms = divmod(ms, round(size * 1000))
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)]
PositiveDuration = Annotated[Duration, Field(gt=0)]


def parse_seconds(value: Any) -> float:
    """A number of seconds (``90``, ``"90"``) or a Prometheus duration: the looser form used by the
    notifiers and the service settings, where a plain number has always meant seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        try:
            return parse_duration(value)
        except PydanticCustomError:
            pass
    raise ValueError(f"{value!r} is not a duration: use e.g. '30s', '5m', '1h30m', '4h' or a number of seconds")


PositiveSeconds = Annotated[float, BeforeValidator(parse_seconds), Field(gt=0)]
"""Seconds, as a float, from a number or a duration string (notifiers and service settings)."""


_STEPS = re.compile(r"(\d+)\s*steps?")


@dataclass(frozen=True)
class Span:
    """A wait measured in seconds or in optimizer steps (``10s``, ``2m``, ``50 steps``).

    Steps make a policy behave alike on a 50-ms-step model and a 2-s-step one; seconds
    are what a scrape-paced rule naturally speaks. A span in steps is measured on the
    run's own ``gradwatch_step``.
    """

    seconds: float = 0.0
    steps: int | None = None

    def __bool__(self) -> bool:
        return bool(self.steps) if self.steps is not None else self.seconds > 0

    def elapsed(self, since_t: float, now: float, since_step: int | None, step: int | None) -> bool:
        """Whether this span has passed since (``since_t``, ``since_step``) at (``now``, ``step``).
        A span in steps with either step unknown falls back to never (it waits for the step to be known)."""
        if self.steps is None:
            return now >= since_t + self.seconds
        if step is None or since_step is None:
            return False
        return step >= since_step + self.steps

    def __truediv__(self, time_scale: float) -> Span:
        """A clock ``time_scale`` times faster (the demo's): seconds shrink, steps stay steps."""
        return Span(self.seconds / time_scale, self.steps)

    def __str__(self) -> str:
        return f"{self.steps} steps" if self.steps is not None else format_duration(self.seconds)


def parse_span(value: Any) -> Span:
    """``50 steps`` / ``50steps`` / ``1 step``, or a Prometheus duration."""
    if isinstance(value, Span):
        return value
    if isinstance(value, str):
        m = _STEPS.fullmatch(value.strip())
        if m:
            return Span(steps=int(m.group(1)))
    try:
        return Span(seconds=parse_duration(value))
    except PydanticCustomError:
        raise PydanticCustomError(
            "span", f"invalid wait {value!r}: use a duration like 30s or 5m, or a number of optimizer steps like '50 steps'"
        ) from None


SpanField = Annotated[Span, BeforeValidator(parse_span), PlainSerializer(str, return_type=str)]
