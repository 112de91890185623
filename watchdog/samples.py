"""In-memory sample windows: what every source fills and every rule reads.

A series is a metric name plus its label set. Each keeps a bounded window of
``(timestamp_s, value)`` points, oldest first, pruned by age and by count, so a
fleet of runs cannot grow the watchdog's memory without bound. Values are floats
and may be NaN or ±Inf: rules must see them as they were scraped.

How much history a series keeps is set per metric name, from what the rules read
(:meth:`SampleStore.set_retention` with
:meth:`~gradwatch.watchdog.engine.RuleEngine.history_needed`): 100 runs of a
400-tensor model are 320k series, and most of them are only ever read at their
latest point.

The store counts its series per ``(run, rank)`` (:meth:`SampleStore.series_of`),
so the scrape source can hold every target to its series limit without a scan.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from operator import itemgetter

Labels = tuple[tuple[str, str], ...]
"""A label set as sorted ``(name, value)`` pairs: hashable, order-independent."""

Point = tuple[float, float]

LOOKBACK_S = 300.0
"""How old a point may be and still count as a series' current value (Prometheus's default lookback delta)."""


def build_labels(labels: Mapping[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


@dataclass(slots=True)
class Series:
    name: str
    labels: Labels
    points: list[Point] = field(default_factory=list)
    """Oldest first, timestamps strictly increasing. A list, not a deque: most series hold
    a point or two, and a list of two costs a tenth of an empty deque."""

    def label(self, key: str, default: str = "") -> str:
        for k, v in self.labels:
            if k == key:
                return v
        return default

    def latest(self, now: float, lookback_s: float = LOOKBACK_S) -> Point | None:
        """The newest point at or before ``now`` if at most ``lookback_s`` old, else None.

        PromQL's instant selector evaluated at ``now`` (``now`` may lie in the past, as
        for ``x offset 10m``).
        """
        pts = self.points
        if not pts:
            return None
        p = pts[-1]
        if p[0] > now:
            i = _after(pts, now)
            if i == 0:
                return None
            p = pts[i - 1]
        return p if p[0] > now - lookback_s else None

    def window(self, now: float, range_s: float) -> list[Point]:
        """Points with ``now - range_s < t <= now``, oldest first (PromQL range-selector semantics).

        Costs the length of the window, not of the history kept: both edges are found
        by bisection.
        """
        pts = self.points
        if not pts:
            return []
        end = len(pts) if pts[-1][0] <= now else _after(pts, now)
        start = 0 if pts[0][0] > now - range_s else _after(pts, now - range_s, hi=end)
        return pts[start:end]


def _after(pts: list[Point], t: float, hi: int | None = None) -> int:
    """Index of the first point later than ``t`` (timestamps are strictly increasing)."""
    return bisect_right(pts, t, 0, len(pts) if hi is None else hi, key=_time)


_time = itemgetter(0)


class _Family:
    """The series of one metric name and how long they keep their points."""

    __slots__ = ("series", "keep_s")

    def __init__(self, keep_s: float) -> None:
        self.series: dict[Labels, Series] = {}
        self.keep_s = keep_s


def _owner(labels: Labels) -> tuple[str, str]:
    """The ``(run, rank)`` a series belongs to ("" for a label it lacks)."""
    run = rank = ""
    for k, v in labels:
        if k == "run":
            run = v
        elif k == "rank":
            rank = v
    return run, rank


class SampleStore:
    """Bounded windows of every series, keyed by metric name, then label set.

    Every series keeps its points for ``max_age_s`` (and at most ``max_points``) until
    :meth:`set_retention` says how long each metric must be kept.
    """

    def __init__(self, max_age_s: float = 3600.0, max_points: int = 2048) -> None:
        self.max_age_s = max_age_s
        self.max_points = max_points
        self._retention: dict[str, float] = {}
        self._default_retention_s = max_age_s
        self._families: dict[str, _Family] = {}
        self._owners: dict[tuple[str, str], int] = {}  # series per (run, rank), kept by add and the drops
        self._series = 0

    def set_retention(self, history_s: Mapping[str, float], default_s: float = 0.0) -> None:
        """Keep each metric in ``history_s`` for that many seconds, every other for ``default_s``.

        A series keeps the points at most that much older than its newest point, and
        always its newest point: ``0`` keeps just the current value. Retention is capped
        at ``max_age_s`` and ``max_points``. Shortening it takes effect for each series
        at its next point; lengthening it cannot bring back what was already dropped.
        Call again after every rules reload.
        """
        if default_s < 0 or any(s < 0 for s in history_s.values()):
            raise ValueError("retention must be >= 0 seconds")
        self._retention = {name: min(s, self.max_age_s) for name, s in history_s.items()}
        self._default_retention_s = min(default_s, self.max_age_s)
        for name, family in self._families.items():
            family.keep_s = self.retention_s(name)

    def retention_s(self, name: str) -> float:
        """How many seconds of history series of metric ``name`` keep behind their newest point."""
        return self._retention.get(name, self._default_retention_s)

    def add(self, t: float, name: str, labels: Labels, value: float) -> None:
        """Append one point; ``labels`` must come from :func:`build_labels`. Older-or-equal timestamps are ignored."""
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = _Family(self.retention_s(name))
        series = family.series.get(labels)
        if series is None:
            series = family.series[labels] = Series(name, labels)
            owner = _owner(labels)
            self._owners[owner] = self._owners.get(owner, 0) + 1
            self._series += 1
        else:
            last_t, last_v = series.points[-1]  # a stored series always holds its newest point
            if t <= last_t:
                return
            if value and value == last_v:
                # Counters and constants repeat their value: share one float object, 24 bytes
                # less per point. Zero is skipped (0.0 == -0.0) and NaN never equals itself,
                # so every point still reads back exactly as scraped.
                value = last_v
        points = series.points
        points.append((t, value))
        horizon = t - family.keep_s
        if points[0][0] < horizon:  # usually one point aged out: a short memmove
            del points[: bisect_left(points, horizon, key=_time)]
        if len(points) > self.max_points:
            del points[: len(points) - self.max_points]

    def select(self, name: str, match: Mapping[str, str] | None = None) -> Iterator[Series]:
        """Every series of ``name`` whose labels include all of ``match`` (exact equality)."""
        family = self._families.get(name)
        if family is None:
            return
        for series in family.series.values():
            if match and any(series.label(k, None) != v for k, v in match.items()):  # type: ignore[arg-type]
                continue
            yield series

    def has(self, name: str, labels: Labels) -> bool:
        """True if the series ``(name, labels)`` is held."""
        family = self._families.get(name)
        return family is not None and labels in family.series

    def drop_older_than(self, t: float) -> None:
        """Forget series whose newest point is older than ``t`` (runs long gone)."""
        for family in self._families.values():
            self._forget(family, [k for k, s in family.series.items() if not s.points or s.points[-1][0] < t])

    def drop_matching(self, match: Mapping[str, str]) -> int:
        """Forget every series whose labels include all of ``match`` (a run that finished cleanly)."""
        dropped = 0
        for family in self._families.values():
            keys = [k for k, s in family.series.items() if all(s.label(n, None) == v for n, v in match.items())]
            self._forget(family, keys)
            dropped += len(keys)
        return dropped

    def _forget(self, family: _Family, keys: list[Labels]) -> None:
        owners = self._owners
        for key in keys:
            del family.series[key]
            owner = _owner(key)
            left = owners[owner] - 1
            if left:
                owners[owner] = left
            else:
                del owners[owner]
        self._series -= len(keys)

    def series_count(self) -> int:
        return self._series

    def series_of(self, run: str, rank: str) -> int:
        """How many series labelled ``run`` and ``rank`` the store holds (one target's, for its series limit)."""
        return self._owners.get((run, rank), 0)

    def point_count(self) -> int:
        """Points held over every series (what the store's memory grows with)."""
        return sum(len(s.points) for f in self._families.values() for s in f.series.values())
