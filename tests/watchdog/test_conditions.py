"""Each rule kind's condition on small, hand-built sample stores."""

import math
import statistics

import pytest
from pydantic import TypeAdapter

from gradwatch.watchdog import metric_names as mn
from gradwatch.watchdog.rules.conditions import evaluate, increase
from gradwatch.watchdog.rules.models import Rule
from gradwatch.watchdog.samples import SampleStore, build_labels

NAN, INF = math.nan, math.inf
RULE = TypeAdapter(Rule)


def rule(kind: str, **fields) -> Rule:
    return RULE.validate_python({"name": "R", "kind": kind, **fields})


def labels(run="r1", rank="0", **more) -> tuple:
    return build_labels({"run": run, "rank": rank, **more})


def put(store: SampleStore, metric: str, values, *, start=0.0, step=2.0, **label_kw) -> float:
    """Append values at ``start, start+step, ...``; returns the last timestamp."""
    t = start
    for i, v in enumerate(values):
        t = start + i * step
        store.add(t, metric, labels(**label_kw), v)
    return t


def fired(kind: str, store: SampleStore, now: float, **fields) -> dict:
    """{alert labels as dict items minus alertname: value} for the matches at ``now``."""
    out = {}
    for m in evaluate(rule(kind, **fields), store, now):
        d = dict(m.labels)
        assert d.pop("alertname") == "R"
        out[tuple(sorted(d.items()))] = m.value
    return out


# --- threshold ---------------------------------------------------------------------------------


def test_threshold_above_and_below_on_the_latest_value():
    s = SampleStore()
    put(s, mn.GRAD_GLOBAL_NORM, [1, 5, 200], run="a")
    put(s, mn.GRAD_GLOBAL_NORM, [300, 5], run="b")
    got = fired("threshold", s, 4, metric=mn.GRAD_GLOBAL_NORM, op="above", value=100)
    assert got == {(("rank", "0"), ("run", "a")): 200}
    got = fired("threshold", s, 4, metric=mn.GRAD_GLOBAL_NORM, op="below", value=10)
    assert list(got.values()) == [5]


def test_threshold_nan_never_matches_but_inf_does():
    s = SampleStore()
    put(s, mn.GRAD_GLOBAL_NORM, [NAN], run="nan")
    put(s, mn.GRAD_GLOBAL_NORM, [INF], run="inf")
    above = fired("threshold", s, 0, metric=mn.GRAD_GLOBAL_NORM, op="above", value=100)
    below = fired("threshold", s, 0, metric=mn.GRAD_GLOBAL_NORM, op="below", value=100)
    assert [dict(k)["run"] for k in above] == ["inf"]
    assert below == {}  # a NaN norm is neither above nor below: the nonfinite rule must see it


def test_threshold_ignores_points_older_than_the_5_minute_lookback():
    s = SampleStore()
    put(s, mn.LOSS, [50])
    assert fired("threshold", s, 300, metric=mn.LOSS, op="above", value=10) == {}
    assert fired("threshold", s, 299, metric=mn.LOSS, op="above", value=10) != {}


def test_alert_labels_are_series_labels_plus_rule_labels_and_alertname():
    s = SampleStore()
    s.add(0, mn.GRAD_NORM, build_labels({"run": "r1", "rank": "0", "layer": "fc1.weight", "severity": "x"}), 9)
    r = rule("threshold", metric=mn.GRAD_NORM, op="above", value=1, labels={"severity": "critical", "team": "ml"})
    (m,) = evaluate(r, s, 0)
    assert dict(m.labels) == {
        "alertname": "R", "run": "r1", "rank": "0", "layer": "fc1.weight", "severity": "critical", "team": "ml",
    }


def test_match_selects_series_by_label_equality():
    s = SampleStore()
    put(s, mn.LOSS, [50], run="a")
    put(s, mn.LOSS, [50], run="b")
    got = fired("threshold", s, 0, metric=mn.LOSS, op="above", value=1, match={"run": "b"})
    assert [dict(k)["run"] for k in got] == ["b"]


# --- nonfinite ------------------------------------------------------------------------------------

SKIPPED = {"metric": mn.SKIPPED_STEPS_TOTAL, "match": {"reason": "nonfinite"}}


def test_increase_matches_prometheus_extrapolation():
    pts = [(10.0, 0.0), (20.0, 1.0), (30.0, 1.0), (40.0, 2.0)]
    # range (5, 45]: 2 counted, extrapolated to the end (+5 s) but not before the counter's zero point
    assert increase(pts, 5.0, 45.0) == pytest.approx(2 * 35 / 30)
    assert increase([(10.0, 3.0), (20.0, 3.0)], 5.0, 25.0) == 0
    assert increase([(10.0, 3.0)], 5.0, 25.0) is None
    # a drop is a reset: 3 -> 1 counts the 1 new event (plus extrapolation), never negative
    assert increase([(10.0, 3.0), (20.0, 3.0), (30.0, 1.0)], 9.0, 31.0) > 0
    assert increase([(10.0, 3.0), (20.0, 3.0), (30.0, 0.0)], 9.0, 31.0) == 0


def test_nonfinite_fires_when_a_counter_rises_and_resolves_when_the_rise_leaves_the_window():
    s = SampleStore()
    t = put(s, mn.SKIPPED_STEPS_TOTAL, [0] * 30 + [1], reason="nonfinite")
    kw = dict(counters=[SKIPPED], gauges=[], window="1m")
    got = fired("nonfinite", s, t, **kw)
    assert list(got) == [(("rank", "0"), ("reason", "nonfinite"), ("run", "r1"))]
    assert list(got.values())[0] == pytest.approx(1.0)
    for i in range(1, 31):
        s.add(t + 2 * i, mn.SKIPPED_STEPS_TOTAL, labels(reason="nonfinite"), 1)
    assert fired("nonfinite", s, t + 56, **kw) != {}  # the 0 at t-2 is still inside (t-4, t+56]
    assert fired("nonfinite", s, t + 58, **kw) == {}  # only 1s left in (t-2, t+58]


def test_nonfinite_ignores_counters_of_other_reasons():
    s = SampleStore()
    t = put(s, mn.SKIPPED_STEPS_TOTAL, [0, 0, 1], reason="commanded")
    assert fired("nonfinite", s, t, counters=[SKIPPED], gauges=[]) == {}


def test_nonfinite_sees_a_counter_created_by_its_first_event_when_the_run_was_already_watched():
    s = SampleStore()
    put(s, mn.STEP, range(0, 100, 1))  # the run has been scraped for 200 s
    # the per-layer counter appears at 1: increase() sees no rise, the run's step series vouches for it
    s.add(198, mn.NONFINITE_GRADS_TOTAL, labels(layer="fc2.weight", kind="nan"), 1)
    s.add(200, mn.NONFINITE_GRADS_TOTAL, labels(layer="fc2.weight", kind="nan"), 1)
    got = fired("nonfinite", s, 200, counters=[{"metric": mn.NONFINITE_GRADS_TOTAL}], gauges=[])
    assert list(got.values()) == [1]
    assert dict(next(iter(got)))["layer"] == "fc2.weight"
    # a minute later the counter is an old series: no rise, no alert
    for t in range(202, 262, 2):
        s.add(t, mn.NONFINITE_GRADS_TOTAL, labels(layer="fc2.weight", kind="nan"), 1)
    assert fired("nonfinite", s, 260, counters=[{"metric": mn.NONFINITE_GRADS_TOTAL}], gauges=[]) == {}


def test_nonfinite_does_not_alert_on_old_counts_after_a_watchdog_restart():
    s = SampleStore()  # fresh store: every series is new, none was watched a window ago
    put(s, mn.STEP, [500, 510])
    put(s, mn.SKIPPED_STEPS_TOTAL, [4, 4], reason="nonfinite")
    assert fired("nonfinite", s, 2, counters=[SKIPPED], gauges=[]) == {}


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_nonfinite_fires_on_a_nan_or_inf_gauge(bad):
    s = SampleStore()
    put(s, mn.LOSS, [2.0, bad])
    got = fired("nonfinite", s, 2, counters=[], gauges=[{"metric": mn.LOSS}])
    (value,) = got.values()
    assert math.isnan(value) if math.isnan(bad) else value == bad


def test_nonfinite_quiet_on_finite_gauges_and_flat_counters():
    s = SampleStore()
    put(s, mn.LOSS, [2.0, 1e30, -1e30])
    put(s, mn.SKIPPED_STEPS_TOTAL, [3] * 40, reason="nonfinite")
    put(s, mn.STEP, range(40))
    assert fired("nonfinite", s, 78, gauges=[{"metric": mn.LOSS}]) == {}


def test_nonfinite_by_run_rank_gives_one_alert_per_rank_with_the_events_summed():
    s = SampleStore()
    for layer in ("a.weight", "b.weight", "c.weight"):
        put(s, mn.NONFINITE_GRADS_TOTAL, [0] * 10 + [2], layer=layer, kind="nan")
    put(s, mn.NONFINITE_GRADS_TOTAL, [0] * 11, rank="1", layer="a.weight", kind="nan")
    put(s, mn.LOSS, [NAN] * 11)
    got = fired(
        "nonfinite", s, 20,
        counters=[{"metric": mn.NONFINITE_GRADS_TOTAL}], gauges=[{"metric": mn.LOSS}], by=["run", "rank"],
    )
    assert list(got) == [(("rank", "0"), ("run", "r1"))]
    assert list(got.values())[0] == pytest.approx(6.0)  # counters come first in the `or`


# --- band -------------------------------------------------------------------------------------------


def test_band_fires_outside_the_log10_band_on_weights_only():
    s = SampleStore()
    ratios = {"fc1.weight": 1e-3, "fc2.weight": 0.5, "fc3.weight": 1e-6, "fc1.bias": 10.0, "fc4.weight": 0.0}
    for layer, ratio in ratios.items():
        put(s, mn.UPDATE_RATIO, [ratio], layer=layer)
    got = {dict(k)["layer"]: v for k, v in fired("band", s, 0).items()}  # defaults: -4..-2, weights
    assert got.keys() == {"fc2.weight", "fc3.weight", "fc4.weight"}
    assert got["fc2.weight"] == pytest.approx(math.log10(0.5))
    assert got["fc4.weight"] == -INF  # log10(0), like PromQL
    above = fired("band", s, 0, side="above", hi=-1)
    assert [dict(k)["layer"] for k in above] == ["fc2.weight"]
    below = fired("band", s, 0, side="below")
    assert {dict(k)["layer"] for k in below} == {"fc3.weight", "fc4.weight"}


def test_band_layer_pattern_is_fully_anchored_and_nan_never_matches():
    s = SampleStore()
    put(s, mn.UPDATE_RATIO, [5.0], layer="fc.weight_orig")
    put(s, mn.UPDATE_RATIO, [NAN], layer="fc.weight")
    put(s, mn.UPDATE_RATIO, [5.0], layer="enc.fc.weight")
    got = fired("band", s, 0, layer_pattern="fc.*weight")
    assert got == {}
    assert len(fired("band", s, 0, layer_pattern=".*weight.*")) == 2


# --- spike -----------------------------------------------------------------------------------------


def test_spike_ratio_compares_with_the_mean_of_the_earlier_points():
    s = SampleStore()
    put(s, mn.GRAD_GLOBAL_NORM_MAX, [1.0] * 9 + [10.0])
    got = fired("spike", s, 18, metric=mn.GRAD_GLOBAL_NORM_MAX, window="1m", factor=10, min_samples=5)
    # 10 / mean(nine 1.0s) = 10 exactly; including the spike in its own mean would give 5.3
    assert list(got.values()) == [pytest.approx(10.0)]
    assert fired("spike", s, 18, metric=mn.GRAD_GLOBAL_NORM_MAX, window="1m", factor=10.5, min_samples=5) == {}


def test_spike_needs_min_samples_in_the_window():
    s = SampleStore()
    put(s, mn.LOSS, [1.0, 1.0, 50.0])
    assert fired("spike", s, 4, metric=mn.LOSS, window="1m", factor=2, min_samples=4) == {}
    assert fired("spike", s, 4, metric=mn.LOSS, window="1m", factor=2, min_samples=3) != {}


def test_spike_window_is_a_time_range_not_a_count():
    s = SampleStore()
    put(s, mn.LOSS, [100.0] * 10 + [1.0] * 10 + [3.0])  # the 100s (t <= 18) are outside (20, 40]
    got = fired("spike", s, 40, metric=mn.LOSS, window="20s", factor=2, min_samples=5)
    assert list(got.values()) == [pytest.approx(3.0)]


@pytest.mark.parametrize(
    "history, current",
    [([0.0] * 9, 0.0), ([0.0] * 9, 1e-3), ([-1.0] * 9, 5.0), ([1.0] * 8 + [NAN], 50.0), ([1.0] * 9, NAN)],
    ids=["all-zero", "zero-mean", "negative-mean", "nan-in-window", "nan-now"],
)
def test_spike_ratio_needs_a_positive_finite_reference(history, current):
    s = SampleStore()
    put(s, mn.LOSS, history + [current])
    assert fired("spike", s, 18, metric=mn.LOSS, window="1m", factor=2, min_samples=5) == {}


def test_spike_zscore_includes_the_current_point_like_stddev_over_time():
    s = SampleStore()
    values = [1.0, 1.2, 0.9, 1.1, 1.0, 0.8, 1.1, 1.0, 0.9, 3.0]
    put(s, mn.LOSS, values)
    z = (values[-1] - statistics.fmean(values)) / statistics.pstdev(values)
    got = fired("spike", s, 18, metric=mn.LOSS, window="1m", mode="zscore", z=2.5, min_samples=5)
    assert list(got.values()) == [pytest.approx(z)]
    assert fired("spike", s, 18, metric=mn.LOSS, window="1m", mode="zscore", z=z + 0.01, min_samples=5) == {}


def test_spike_zscore_on_a_flat_window_is_nan_not_a_false_alarm():
    s = SampleStore()
    put(s, mn.LOSS, [2.0] * 10)
    assert fired("spike", s, 18, metric=mn.LOSS, window="1m", mode="zscore", z=1, min_samples=5) == {}
    # an outlier after a flat stretch scores sqrt(n - 1), the most n points allow — not Inf
    s2 = SampleStore()
    put(s2, mn.LOSS, [2.0] * 9 + [9.0])
    got = fired("spike", s2, 18, metric=mn.LOSS, window="1m", mode="zscore", z=2, min_samples=5)
    assert list(got.values()) == [pytest.approx(3.0)]


# --- depth -------------------------------------------------------------------------------------------


def layered(store, values: dict[str, tuple[int, float]], run="r1", rank="0", t=0.0):
    for layer, (depth, mean_abs) in values.items():
        store.add(t, mn.LAYER_DEPTH, labels(run, rank, layer=layer), depth)
        store.add(t, mn.GRAD_ABS_MEAN, labels(run, rank, layer=layer), mean_abs)


def test_depth_compares_the_shallowest_and_deepest_weight_layers():
    s = SampleStore()
    layered(s, {"z_in.weight": (0, 1e-12), "a_out.weight": (3, 1e-2), "mid.weight": (1, 1e-6), "a_out.bias": (3, 1e3)})
    got = fired("depth", s, 0, bound=-6)
    assert list(got) == [(("first_layer", "z_in.weight"), ("last_layer", "a_out.weight"), ("rank", "0"), ("run", "r1"))]
    assert list(got.values()) == [pytest.approx(-10.0)]
    assert fired("depth", s, 0, bound=-11) == {}


def test_depth_is_per_run_and_rank():
    s = SampleStore()
    layered(s, {"in.weight": (0, 1e-20), "out.weight": (1, 1.0)}, run="sick")
    layered(s, {"in.weight": (0, 1e-2), "out.weight": (1, 1.0)}, run="fine")
    layered(s, {"in.weight": (0, 1e-20), "out.weight": (1, 1.0)}, run="sick", rank="1")
    got = fired("depth", s, 0)
    assert sorted((dict(k)["run"], dict(k)["rank"]) for k in got) == [("sick", "0"), ("sick", "1")]


def test_depth_skips_layers_without_gradient_or_depth_and_single_layers():
    s = SampleStore()
    # a frozen first layer reports 0: not evidence of vanishing; the next one is compared instead
    layered(s, {"frozen.weight": (0, 0.0), "l1.weight": (1, 1e-3), "l2.weight": (2, 1e-2)})
    s.add(0, mn.GRAD_ABS_MEAN, labels(layer="nodepth.weight"), 1e-30)
    got = fired("depth", s, 0, bound=-0.5)
    assert [dict(k)["first_layer"] for k in got] == ["l1.weight"]
    s2 = SampleStore()
    layered(s2, {"only.weight": (0, 1e-30)})
    assert fired("depth", s2, 0) == {}


# --- plateau ---------------------------------------------------------------------------------------


def plateau_store(loss_values, ratios: dict[str, float]) -> tuple[SampleStore, float]:
    s = SampleStore()
    t = put(s, mn.LOSS, loss_values)
    for layer, r in ratios.items():
        s.add(t, mn.UPDATE_RATIO, labels(layer=layer), r)
    return s, t


FLAT = [2.302585 * (1 + 1e-4 * ((i % 7) - 3)) for i in range(60)]


def test_plateau_fires_when_the_loss_is_flat_and_every_update_is_tiny():
    s, t = plateau_store(FLAT, {"fc1.weight": 1e-7, "fc2.weight": 5e-8, "fc1.bias": 1.0})
    got = fired("plateau", s, t, window="2m", min_samples=30)
    (rel,) = got.values()
    assert rel == pytest.approx((max(FLAT) - min(FLAT)) / statistics.fmean(FLAT))


@pytest.mark.parametrize(
    "loss, ratios",
    [
        (FLAT, {"fc1.weight": 1e-7, "fc2.weight": 1e-3}),  # one layer still learns
        ([2.3 + 0.1 * (i % 3) for i in range(60)], {"fc1.weight": 1e-7}),  # loss still moves
        (FLAT[:20], {"fc1.weight": 1e-7}),  # too few samples
        (FLAT, {}),  # no update ratios: no evidence of tiny updates
    ],
    ids=["one-layer-learns", "loss-moves", "few-samples", "no-ratios"],
)
def test_plateau_stays_quiet(loss, ratios):
    s, t = plateau_store(loss, ratios)
    assert fired("plateau", s, t, window="2m", min_samples=30) == {}


# --- stall ------------------------------------------------------------------------------------------------


def test_stall_fires_when_the_step_did_not_change_over_the_window():
    s = SampleStore()
    t = put(s, mn.STEP, list(range(10)) + [10] * 40)  # last change at t=20
    got = fired("stall", s, t, window="1m")
    assert list(got.values()) == [10]
    assert fired("stall", s, 76, window="1m") == {}  # the 9 at t=18 is still in (16, 76]
    assert fired("stall", s, 78, window="1m") != {}  # (18, 78] holds only 10s


def test_stall_waits_until_the_series_was_watched_for_a_whole_window():
    s = SampleStore()
    t = put(s, mn.STEP, [0] * 20)  # a run still compiling its first step, seen for 38 s
    assert fired("stall", s, t, window="1m") == {}


def test_stall_fires_when_the_scrape_went_silent_until_forget_after():
    s = SampleStore()
    t = put(s, mn.STEP, range(30))
    assert fired("stall", s, t + 30, window="1m") == {}
    # from t+2 on the window holds one unchanging point, then none: a stall either way
    assert list(fired("stall", s, t + 59, window="1m").values()) == [29]
    assert list(fired("stall", s, t + 60, window="1m", forget_after="1h").values()) == [29]
    assert list(fired("stall", s, t + 3599, window="1m", forget_after="1h").values()) == [29]
    assert fired("stall", s, t + 3600, window="1m", forget_after="1h") == {}  # a run long gone
    assert fired("stall", s, t + 60, window="1m", stale=False) == {}
