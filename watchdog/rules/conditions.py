"""Each rule kind's condition: which label sets match now, and with what value.

One pure function per kind, ``(rule, store, now) -> list[Match]``: no state, no I/O,
no clock but ``now``. The state machine (:mod:`gradwatch.watchdog.alerting`) turns
matches into pending/firing alerts. Semantics follow PromQL so every kind except
depth and plateau can be exported as an equal Prometheus rule:

* the current value of a series is its newest point at most 5 min old (lookback);
* a range ``[w]`` holds the points with ``now - w < t <= now``;
* NaN compares false, so a NaN value never matches a threshold, band or spike —
  the nonfinite rule is what catches NaN and Inf.

Every pass is one scan over the series of each metric the rule reads; a window
costs its own points, not the history kept (see :meth:`Series.window`).
:func:`history_needed` says how far back each kind reads, so the store can keep
just that much (:meth:`SampleStore.set_retention`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import NamedTuple

from gradwatch.watchdog.rules.models import (
    BandRule,
    DepthRule,
    NonFiniteRule,
    PlateauRule,
    Rule,
    SpikeRule,
    StallRule,
    ThresholdRule,
)
from gradwatch.watchdog.samples import LOOKBACK_S, Labels, Point, SampleStore, Series, build_labels


class Match(NamedTuple):
    """One alert instance the condition holds for: its full label set and its value (``$value``)."""

    labels: Labels
    value: float


def evaluate(rule: Rule, store: SampleStore, now: float) -> list[Match]:
    """Run ``rule``'s condition on ``store`` at ``now``."""
    return CONDITIONS[rule.kind](rule, store, now)


def history_needed(rule: Rule) -> dict[str, float]:
    """Each metric ``rule`` reads → seconds of history it needs behind the series' newest point.

    0: only the current value (the newest point, which the store always keeps).
    ``w``: a range ``[w]``. ``w + LOOKBACK_S``: an instant read at ``now - w`` (``offset w``),
    which takes the newest point up to 5 min before that. ``for`` needs no samples: the
    alert's state machine remembers how long the condition has held. Keep in step with
    the kinds below: a read missing here silently shortens a window.
    """
    need: dict[str, float] = {}

    def reads(metric: str | None, seconds: float) -> None:
        if metric is not None:
            need[metric] = max(need.get(metric, 0.0), seconds)

    match rule:
        case ThresholdRule() | BandRule():
            reads(rule.metric, 0.0)
        case NonFiniteRule():
            # counters: increase over [window]; "born since" reads them (and the anchor) at now - window
            at_offset = rule.window + LOOKBACK_S if rule.anchor is not None else rule.window
            for sel in rule.counters:
                reads(sel.metric, at_offset)
            for sel in rule.gauges:
                reads(sel.metric, 0.0)
            reads(rule.anchor, rule.window + LOOKBACK_S)
        case SpikeRule():
            reads(rule.metric, rule.window)
        case DepthRule():
            reads(rule.metric, 0.0)
            reads(rule.depth_metric, 0.0)
        case PlateauRule():
            reads(rule.metric, rule.window)
            reads(rule.ratio_metric, 0.0)
        case StallRule():
            reads(rule.metric, rule.window + LOOKBACK_S)  # [window] and "already there" at now - window
        case _:
            raise TypeError(f"no history known for rule kind {rule.kind!r}")
    return need


# --- helpers ---------------------------------------------------------------------------


def alert_labels(rule: Rule, labels: Iterable[tuple[str, str]]) -> Labels:
    """Series labels (``__name__`` dropped) + the rule's labels (which win) + ``alertname``."""
    out = {k: v for k, v in labels if k != "__name__"}
    out.update(rule.labels)
    out["alertname"] = rule.name
    return build_labels(out)


def _log10(v: float) -> float:
    """PromQL ``log10``: -Inf at 0, NaN below 0 or for NaN, +Inf at +Inf."""
    if v > 0:
        return math.log10(v)
    return -math.inf if v == 0 else math.nan


def _finite(v: float) -> bool:
    return not (math.isnan(v) or math.isinf(v))


@lru_cache(maxsize=256)
def _layer_filter(pattern: str) -> Callable[[str], bool]:
    """A fully anchored matcher for ``pattern`` that remembers each layer name's answer.

    Layer names repeat every evaluation (and across runs of one model), so the regex
    runs once per distinct name, not once per series per evaluation.
    """
    rx = re.compile(pattern)
    seen: dict[str, bool] = {}

    def ok(layer: str) -> bool:
        hit = seen.get(layer)
        if hit is None:
            if len(seen) > 200_000:  # bound memory against endless distinct names
                seen.clear()
            hit = seen[layer] = rx.fullmatch(layer) is not None
        return hit

    return ok


def _without(labels: Labels, drop: str) -> Labels:
    return tuple(kv for kv in labels if kv[0] != drop and kv[0] != "__name__")


def increase(points: list[Point], start: float, end: float) -> float | None:
    """PromQL ``increase()`` of counter ``points`` in ``(start, end]``: None below 2 points.

    Prometheus's ``extrapolatedRate``: a drop is a counter reset (the value before the
    drop is added back); the result is extrapolated towards the range edges, but never
    below the counter's zero point, and is > 0 exactly when the counter rose.
    """
    if len(points) < 2:
        return None
    (t0, v0), (t1, v1) = points[0], points[-1]
    result, prev = v1 - v0, v0
    for _, v in points[1:]:
        if v < prev:
            result += prev
        prev = v
    to_start, to_end = t0 - start, end - t1
    sampled = t1 - t0
    avg_step = sampled / (len(points) - 1)
    if result > 0 and v0 >= 0:
        to_start = min(to_start, sampled * (v0 / result))
    limit = avg_step * 1.1
    span = sampled + (to_start if to_start < limit else avg_step / 2) + (to_end if to_end < limit else avg_step / 2)
    return result * (span / sampled)


# --- kinds ------------------------------------------------------------------------------


def threshold(rule: ThresholdRule, store: SampleStore, now: float) -> list[Match]:
    """``metric > value`` (above) or ``metric < value`` (below) on each series' current value."""
    out = []
    above = rule.op == "above"
    for s in store.select(rule.metric, rule.match):
        p = s.latest(now)
        if p is not None and (p[1] > rule.value if above else p[1] < rule.value):
            out.append(Match(alert_labels(rule, s.labels), p[1]))
    return out


def nonfinite(rule: NonFiniteRule, store: SampleStore, now: float) -> list[Match]:
    """New NaN/Inf events: counters that rose in ``window``, counters born since, gauges NaN/±Inf.

    Operands are combined like PromQL ``or``: the first to produce a label set wins it.
    Values: the counter's increase (or its value when newly created); the gauge value.
    """
    found: dict[Labels, float] = {}
    anchors: set[tuple[str, str]] | None = None

    def anchored(s: Series) -> bool:
        nonlocal anchors
        if anchors is None:  # built once, and only if some counter looks newly created
            anchors = {
                (a.label("run"), a.label("rank"))
                for a in store.select(rule.anchor, rule.match)  # type: ignore[arg-type]
                if a.latest(now - rule.window) is not None
            }
        return (s.label("run"), s.label("rank")) in anchors

    def add(operand: dict[Labels, float]) -> None:
        for labels, v in operand.items():
            found.setdefault(labels, v)

    for sel in rule.counters:
        operand: dict[Labels, float] = {}
        for s in store.select(sel.metric, {**rule.match, **sel.match}):
            inc = increase(s.window(now, rule.window), now - rule.window, now)
            if inc is not None and inc > 0:
                _accumulate(operand, rule.by, s.labels, inc)
            elif rule.anchor is not None:
                cur = s.latest(now)
                if cur is not None and cur[1] > 0 and s.latest(now - rule.window) is None and anchored(s):
                    _accumulate(operand, rule.by, s.labels, cur[1])
        add({k: v for k, v in operand.items() if v > rule.min_increase})
    for sel in rule.gauges:
        operand = {}
        for s in store.select(sel.metric, {**rule.match, **sel.match}):
            p = s.latest(now)
            if p is not None and not _finite(p[1]):
                _accumulate(operand, rule.by, s.labels, p[1])
        add(operand)
    return [Match(alert_labels(rule, labels), v) for labels, v in found.items()]


def _accumulate(operand: dict[Labels, float], by: list[str] | None, labels: Labels, value: float) -> None:
    """Add one series to an operand: as itself, or summed into its ``sum by (by)`` group."""
    if by is None:
        operand[_without(labels, "__name__")] = value
        return
    key = tuple(kv for kv in labels if kv[0] in by and kv[1])
    operand[key] = operand.get(key, 0.0) + value


def band(rule: BandRule, store: SampleStore, now: float) -> list[Match]:
    """log10 of each matching layer's current value outside ``[lo, hi]`` on the watched side(s)."""
    out = []
    layer_ok = _layer_filter(rule.layer_pattern)
    check_hi, check_lo = rule.side != "below", rule.side != "above"
    for s in store.select(rule.metric, rule.match):
        if not layer_ok(s.label("layer")):
            continue
        p = s.latest(now)
        if p is None:
            continue
        lv = _log10(p[1])
        if (check_hi and lv > rule.hi) or (check_lo and lv < rule.lo):
            out.append(Match(alert_labels(rule, s.labels), lv))
    return out


def spike(rule: SpikeRule, store: SampleStore, now: float) -> list[Match]:
    """The current value vs its window: ratio to the earlier points' mean, or z-score within the window."""
    out = []
    for s in store.select(rule.metric, rule.match):
        pts = s.window(now, rule.window)
        n = len(pts)
        if n < rule.min_samples:
            continue
        x = pts[-1][1]
        if rule.mode == "ratio":
            # (sum_over_time - x) / (count_over_time - 1), as the exported PromQL computes it
            ref = (sum(v for _, v in pts) - x) / (n - 1)
            score = x / ref if ref > 0 else math.nan
            hit = score >= rule.factor  # type: ignore[operator]
        else:
            score = _zscore(x, pts)
            hit = score >= rule.z  # type: ignore[operator]
        if hit:
            out.append(Match(alert_labels(rule, s.labels), score))
    return out


def _zscore(x: float, points: list[Point]) -> float:
    """``(x - avg_over_time) / stddev_over_time`` with float division semantics (x/0 = ±Inf, 0/0 = NaN).

    Mean and population stddev by Welford's update, as PromQL's ``stddev_over_time``:
    a constant window gives exactly 0, so only a value off a flat window scores ±Inf.
    """
    mean = aux = 0.0
    for count, (_, v) in enumerate(points, 1):
        delta = v - mean
        mean += delta / count
        aux += delta * (v - mean)
    std = math.sqrt(aux / len(points)) if aux >= 0 else math.nan
    dev = x - mean
    if std > 0 or math.isnan(std):
        return dev / std
    return math.nan if dev == 0 or math.isnan(dev) else math.copysign(math.inf, dev)


def depth(rule: DepthRule, store: SampleStore, now: float) -> list[Match]:
    """log10(metric of the shallowest layer / of the deepest) < bound, per run and rank.

    Layers are joined to their depth by identical labels; candidates need a finite,
    positive current value (a frozen or unreached layer reports 0 and is no evidence
    of vanishing; NaN/Inf is the nonfinite rule's). At least two layers are needed.
    """
    layer_ok = _layer_filter(rule.layer_pattern)
    depth_of: dict[Labels, float] = {}
    for s in store.select(rule.depth_metric, rule.match):
        if layer_ok(s.label("layer")):
            p = s.latest(now)
            if p is not None and _finite(p[1]):
                depth_of[s.labels] = p[1]
    # group (labels without layer) -> [shallowest, deepest] as (depth, layer, value)
    ends: dict[Labels, list[tuple[float, str, float]]] = {}
    for s in store.select(rule.metric, rule.match):
        d = depth_of.get(s.labels)
        if d is None:
            continue
        p = s.latest(now)
        if p is None or not (p[1] > 0 and _finite(p[1])):
            continue
        entry = (d, s.label("layer"), p[1])
        group = _without(s.labels, "layer")
        pair = ends.get(group)
        if pair is None:
            ends[group] = [entry, entry]
        else:
            pair[0] = min(pair[0], entry)
            pair[1] = max(pair[1], entry)
    out = []
    for group, (first, last) in ends.items():
        if first[1] == last[1]:  # a single layer: nothing to compare
            continue
        score = math.log10(first[2]) - math.log10(last[2])
        if score < rule.bound:
            labels = alert_labels(rule, group + (("first_layer", first[1]), ("last_layer", last[1])))
            out.append(Match(labels, score))
    return out


def plateau(rule: PlateauRule, store: SampleStore, now: float) -> list[Match]:
    """Loss flat over the window (relative range < rel_range) while the largest update ratio is < max_update_ratio."""
    layer_ok = _layer_filter(rule.layer_pattern)
    largest: dict[Labels, float] = {}  # run/rank group -> max over layers (NaN ignored, like PromQL max)
    for s in store.select(rule.ratio_metric, rule.match):
        if not layer_ok(s.label("layer")):
            continue
        p = s.latest(now)
        if p is None or math.isnan(p[1]):
            continue
        group = _without(s.labels, "layer")
        if p[1] > largest.get(group, -math.inf):
            largest[group] = p[1]
    out = []
    for s in store.select(rule.metric, rule.match):
        top = largest.get(_without(s.labels, "__name__"))
        if top is None or not top < rule.max_update_ratio:
            continue
        values = [v for _, v in s.window(now, rule.window)]
        if len(values) < rule.min_samples or not all(map(_finite, values)):
            continue
        mean = sum(values) / len(values)
        if mean == 0:
            continue
        rel = (max(values) - min(values)) / abs(mean)
        if rel < rule.rel_range:
            out.append(Match(alert_labels(rule, s.labels), rel))
    return out


def stall(rule: StallRule, store: SampleStore, now: float) -> list[Match]:
    """The step did not change over the window although watched that long, or its scrape went silent."""
    out = []
    for s in store.select(rule.metric, rule.match):
        pts = s.window(now, rule.window)
        if pts:
            v0 = pts[0][1]
            unchanged = all(v == v0 or (math.isnan(v) and math.isnan(v0)) for _, v in pts)
            if unchanged and s.latest(now - rule.window) is not None:
                out.append(Match(alert_labels(rule, s.labels), pts[-1][1]))
        elif rule.stale:
            last = s.latest(now, rule.forget_after)  # silent for window, but not for forget_after
            if last is not None:
                out.append(Match(alert_labels(rule, s.labels), last[1]))
    return out


CONDITIONS: dict[str, Callable[..., list[Match]]] = {
    "threshold": threshold,
    "nonfinite": nonfinite,
    "band": band,
    "spike": spike,
    "depth": depth,
    "plateau": plateau,
    "stall": stall,
}
