"""The sample store: PromQL-style reads of a series, and retention set from what the rules read."""

from __future__ import annotations

import math
import random

import pytest
from pydantic import TypeAdapter

from gradwatch.watchdog import metric_names as mn
from gradwatch.watchdog.engine import RuleEngine
from gradwatch.watchdog.rules import conditions
from gradwatch.watchdog.rules.conditions import evaluate
from gradwatch.watchdog.rules.loader import load_rules
from gradwatch.watchdog.rules.models import RULE_MODELS, Rule
from gradwatch.watchdog.samples import LOOKBACK_S, SampleStore, build_labels

NAN, INF = math.nan, math.inf
L = build_labels({"run": "r1", "rank": "0"})
RULE = TypeAdapter(Rule)


def rule(kind: str, **fields) -> Rule:
    return RULE.validate_python({"name": f"R-{kind}", "kind": kind, **fields})


def series_of(store: SampleStore, metric: str = mn.LOSS):
    [s] = store.select(metric)
    return s


def filled(times, values=None, metric: str = mn.LOSS) -> SampleStore:
    store = SampleStore()
    for i, t in enumerate(times):
        store.add(t, metric, L, float(i) if values is None else values[i])
    return store


# --- reads -----------------------------------------------------------------------------------


def test_window_is_the_promql_range_left_open_right_closed():
    s = series_of(filled([0, 2, 4, 6, 8, 10]))
    assert s.window(10, 6) == [(6, 3.0), (8, 4.0), (10, 5.0)]  # (4, 10]
    assert s.window(9, 6) == [(4, 2.0), (6, 3.0), (8, 4.0)]  # now between points, and a point after now
    assert s.window(100, 50) == []
    assert s.window(-1, 10) == []
    assert s.window(10, 1000) == [(t, float(i)) for i, t in enumerate([0, 2, 4, 6, 8, 10])]


def test_window_edges_hold_whatever_the_values_nan_and_inf_included():
    values = [NAN, INF, -INF, NAN, 1.0]
    s = series_of(filled([0, 1, 2, 3, 4], values))
    got = s.window(3, 2)  # (1, 3]
    assert [t for t, _ in got] == [2, 3] and got[0][1] == -INF and math.isnan(got[1][1])
    assert [t for t, _ in s.window(1, 1)] == [1]


def test_latest_is_the_newest_point_at_or_before_now_within_the_lookback():
    s = series_of(filled([0, 10, 20]))
    assert s.latest(20) == (20, 2.0)
    assert s.latest(15) == (10, 1.0)  # evaluated in the past: the point after `now` is not seen
    assert s.latest(-1) is None
    assert s.latest(20 + LOOKBACK_S - 1) == (20, 2.0)
    assert s.latest(20 + LOOKBACK_S) is None  # exactly 5 min old: stale, as in Prometheus
    assert s.latest(20 + 100, lookback_s=100) is None and s.latest(20 + 99, lookback_s=100) == (20, 2.0)


def test_older_or_equal_timestamps_are_ignored():
    store = filled([0, 2, 4])
    store.add(4, mn.LOSS, L, 99.0)
    store.add(1, mn.LOSS, L, 99.0)
    assert list(series_of(store).points) == [(0, 0.0), (2, 1.0), (4, 2.0)]


# --- retention -----------------------------------------------------------------------------------


def test_without_set_retention_every_series_keeps_max_age():
    store = SampleStore(max_age_s=10.0)
    for t in range(0, 31, 2):
        store.add(t, mn.LOSS, L, 1.0)
        store.add(t, mn.GRAD_NORM, L, 1.0)
    assert [t for t, _ in series_of(store).points] == [20, 22, 24, 26, 28, 30]
    assert store.retention_s(mn.GRAD_NORM) == 10.0
    assert store.point_count() == 12


def test_set_retention_keeps_each_metric_as_long_as_asked_and_others_only_their_latest_point():
    store = SampleStore()
    store.set_retention({mn.LOSS: 6.0, mn.STEP: 0.0})
    for t in range(0, 21, 2):
        for name in (mn.LOSS, mn.STEP, mn.GRAD_NORM):
            store.add(t, name, L, float(t))
    assert [t for t, _ in series_of(store, mn.LOSS).points] == [14, 16, 18, 20]  # newest - 6 s and later
    assert list(series_of(store, mn.STEP).points) == [(20, 20.0)]
    assert list(series_of(store, mn.GRAD_NORM).points) == [(20, 20.0)]  # read by no rule
    assert store.point_count() == 6


def test_a_default_keeps_unlisted_metrics_that_long():
    store = SampleStore()
    store.set_retention({mn.LOSS: 6.0}, default_s=2.0)
    for t in range(0, 11, 2):
        store.add(t, mn.GRAD_NORM, L, 1.0)
    assert [t for t, _ in series_of(store, mn.GRAD_NORM).points] == [8, 10]


def test_shorter_retention_applies_to_existing_series_at_their_next_point():
    store = filled(range(0, 101, 2))
    store.set_retention({mn.LOSS: 10.0})
    assert len(series_of(store).points) == 51  # nothing is pruned until the series moves on
    store.add(102, mn.LOSS, L, 0.0)
    assert [t for t, _ in series_of(store).points] == [92, 94, 96, 98, 100, 102]
    store.set_retention({mn.LOSS: 100.0})  # longer again: what was dropped stays dropped
    store.add(104, mn.LOSS, L, 0.0)
    assert [t for t, _ in series_of(store).points][0] == 92


def test_retention_is_capped_by_max_age_and_max_points():
    store = SampleStore(max_age_s=10.0, max_points=3)
    store.set_retention({mn.LOSS: 1000.0}, default_s=1000.0)
    assert store.retention_s(mn.LOSS) == 10.0 and store.retention_s(mn.STEP) == 10.0
    for t in range(0, 21, 2):
        store.add(t, mn.LOSS, L, 1.0)
    assert [t for t, _ in series_of(store).points] == [16, 18, 20]


def test_negative_retention_is_refused():
    with pytest.raises(ValueError, match=">= 0"):
        SampleStore().set_retention({mn.LOSS: -1.0})
    with pytest.raises(ValueError, match=">= 0"):
        SampleStore().set_retention({}, default_s=-1.0)


# --- what the rules need -------------------------------------------------------------------------


def test_the_default_pack_needs_history_only_for_what_it_reads_over_time():
    need = RuleEngine(load_rules().rules).history_needed()
    assert need == {
        # counters: increase over 1m, and "born since" reads them and the step at now - 1m
        mn.NONFINITE_GRADS_TOTAL: 60 + LOOKBACK_S,
        mn.SKIPPED_STEPS_TOTAL: 60 + LOOKBACK_S,
        mn.SPIKE_CLIPPED_STEPS_TOTAL: 60 + LOOKBACK_S,
        mn.STEP: max(60, 600) + LOOKBACK_S,  # stall: [10m] and "already there" 10m ago
        mn.GRAD_GLOBAL_NORM_MAX: 120,  # spike over 2m
        mn.LOSS: 600,  # plateau over 10m (loss spike: 5m)
        # read at their current value only
        mn.GRAD_GLOBAL_NORM: 0,
        mn.UPDATE_RATIO: 0,
        mn.GRAD_ABS_MEAN: 0,
        mn.LAYER_DEPTH: 0,
        mn.GUARD_HELD_FRACTION: 0,
        mn.GUARD_HELD_RATIO_MAX: 0,
    }
    # every per-layer metric the pack does not compare over time keeps one point per series
    assert mn.GRAD_NORM not in need and mn.PARAM_NORM not in need


def test_history_needed_follows_each_rules_parameters():
    engine = RuleEngine([
        rule("threshold", metric=mn.GRAD_NORM, op="above", value=1),
        rule("nonfinite", window="2m", anchor=None, counters=[{"metric": "c_total"}], gauges=[]),
        rule("spike", metric=mn.GRAD_NORM, mode="zscore", z=6, window="4m"),
        rule("plateau", metric="my_loss", window="20m", ratio_metric="my_ratio"),
        rule("stall", metric="my_step", window="1m", forget_after="10m"),
    ])
    assert engine.history_needed() == {
        mn.GRAD_NORM: 240,
        "c_total": 120,  # no anchor: only increase() over the window
        "my_loss": 1200,
        "my_ratio": 0,
        "my_step": 60 + LOOKBACK_S,
    }
    engine.replace_rules([rule("threshold", metric=mn.LOSS, op="above", value=1)])
    assert engine.history_needed() == {mn.LOSS: 0}


def _extra_rules() -> list[Rule]:
    """Rules with the parameters the default pack does not use."""
    return [
        rule("spike", metric=mn.LOSS, mode="zscore", z=3, window="3m", min_samples=10),
        rule("nonfinite", window="30s", anchor=None, by=None),
        rule("stall", metric=mn.STEP, window="2m", forget_after="20m"),
        rule("threshold", metric=mn.GRAD_NORM, op="above", value=0.5),
    ]


def test_every_rule_kind_says_what_history_it_needs():
    # A new kind must be added to history_needed (and to the equivalence test below):
    # a metric it reads over time would otherwise keep only its latest point.
    kinds = {r.kind for r in load_rules().rules} | {r.kind for r in _extra_rules()}
    assert kinds == set(RULE_MODELS)
    for r in [*load_rules().rules, *_extra_rules()]:
        assert conditions.history_needed(r)


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _fleet_scrape(rng: random.Random, i: int) -> list[tuple[str, dict, float]] | None:
    """One scrape of a run with every kind of history the rules read: gaps, NaNs, new counters, stalls."""
    if 200 <= i < 260 or rng.random() < 0.05:  # a 2-minute outage, and scattered missed scrapes
        return None
    step = float(min(i, 400) * 10)  # stalls from scrape 400 on
    out = [
        (mn.STEP, {}, step),
        (mn.LOSS, {}, NAN if i == 150 else (0.02 if 450 < i < 800 else 2.0 * math.exp(rng.gauss(0, 0.3)))),
        (mn.GRAD_GLOBAL_NORM, {}, 1.0),
        (mn.GRAD_GLOBAL_NORM_MAX, {}, 50.0 if i % 97 == 0 else math.exp(rng.gauss(0, 0.5))),
        (mn.SKIPPED_STEPS_TOTAL, {"reason": "nonfinite"}, float(i // 120)),
    ]
    for d, layer in enumerate(("a.weight", "b.weight", "c.weight")):
        tiny = 450 < i < 800
        labels = {"layer": layer}
        out += [
            (mn.LAYER_DEPTH, labels, float(d)),
            (mn.UPDATE_RATIO, labels, 1e-8 if tiny else (3.0 if i % 50 < 40 and layer == "b.weight" else 1e-3)),
            (mn.GRAD_ABS_MEAN, labels, 1e-9 if (d == 0 and i > 300) else 1e-3),
            (mn.GRAD_NORM, labels, 1.0),
        ]
        if i >= 90 + 60 * d:  # counters born at different times, then rising now and then
            out.append((mn.NONFINITE_GRADS_TOTAL, {**labels, "kind": "nan"}, float(1 + (i - 90) // 70)))
    return out


def test_retention_from_history_needed_never_changes_a_rules_answer():
    rules = [*load_rules().rules, *_extra_rules()]
    full, kept = SampleStore(max_age_s=7200, max_points=10_000), SampleStore(max_age_s=7200, max_points=10_000)
    kept.set_retention(RuleEngine(rules).history_needed())
    rng = random.Random(7)
    fired = 0
    for i in range(900):  # 30 minutes of 2-s scrapes, two runs
        t = 1000.0 + 2 * i
        for run in ("r1", "r2"):
            scrape = _fleet_scrape(rng, i + (0 if run == "r1" else 37))
            for name, labels, value in scrape or ():
                key = build_labels({"run": run, "rank": "0", **labels})
                full.add(t, name, key, value)
                kept.add(t, name, key, value)
        for now in (t, t + 1.5):  # at the scrape, and between scrapes
            for r in rules:
                want, got = evaluate(r, full, now), evaluate(r, kept, now)
                assert [m.labels for m in got] == [m.labels for m in want], (r.name, i)
                assert all(same(a.value, b.value) for a, b in zip(got, want)), (r.name, i)
                fired += len(want)
    assert fired > 1000  # the scenario does make rules match
    assert kept.point_count() < full.point_count() / 4
