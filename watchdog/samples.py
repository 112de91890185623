"""In-memory sample windows: what every source fills and every rule reads.

A series is a metric name plus its label set. Each keeps a bounded window of
``(timestamp_s, value)`` points, oldest first, pruned by age and by count, so a
fleet of runs cannot grow the watchdog's memory without bound. Values are floats
and may be NaN or ±Inf: rules must see them as they were scraped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]
"""A label set as sorted ``(name, value)`` pairs: hashable, order-independent."""

LOOKBACK_S = 300.0
"""How old a point may be and still count as a series' current value (Prometheus's default lookback delta)."""


def build_labels(labels: Mapping[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


@dataclass
class Series:
    name: str
    labels: Labels
    points: deque[tuple[float, float]] = field(default_factory=deque)

    def label(self, key: str, default: str = "") -> str:
        for k, v in self.labels:
            if k == key:
                return v
        return default

    def latest(self, now: float, lookback_s: float = LOOKBACK_S) -> tuple[float, float] | None:
        """The newest point if it is at most ``lookback_s`` old at ``now``, else None."""
        if not self.points:
            return None
        t, v = self.points[-1]
        return (t, v) if now - lookback_s < t <= now else None

    def window(self, now: float, range_s: float) -> list[tuple[float, float]]:
        """Points with ``now - range_s < t <= now`` (PromQL range-selector semantics)."""
        start = now - range_s
        return [(t, v) for t, v in self.points if start < t <= now]


class SampleStore:
    """Bounded windows of every series, keyed by metric name, then label set."""

    def __init__(self, max_age_s: float = 3600.0, max_points: int = 2048) -> None:
        self.max_age_s = max_age_s
        self.max_points = max_points
        self._by_name: dict[str, dict[Labels, Series]] = {}

    def add(self, t: float, name: str, labels: Labels, value: float) -> None:
        """Append one point; ``labels`` must come from :func:`build_labels`. Older-or-equal timestamps are ignored."""
        family = self._by_name.setdefault(name, {})
        series = family.get(labels)
        if series is None:
            series = family[labels] = Series(name, labels, deque(maxlen=self.max_points))
        elif series.points and t <= series.points[-1][0]:
            return
        series.points.append((t, value))
        horizon = t - self.max_age_s
        while series.points[0][0] < horizon:
            series.points.popleft()

    def select(self, name: str, match: Mapping[str, str] | None = None) -> Iterator[Series]:
        """Every series of ``name`` whose labels include all of ``match`` (exact equality)."""
        for series in self._by_name.get(name, {}).values():
            if match and any(series.label(k, None) != v for k, v in match.items()):  # type: ignore[arg-type]
                continue
            yield series

    def drop_older_than(self, t: float) -> None:
        """Forget series whose newest point is older than ``t`` (runs long gone)."""
        for family in self._by_name.values():
            for key in [k for k, s in family.items() if not s.points or s.points[-1][0] < t]:
                del family[key]

    def series_count(self) -> int:
        return sum(len(f) for f in self._by_name.values())
