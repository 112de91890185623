"""The default pack's rules on the agent's guard: a silent rescue is reported, a lost run pages."""

from __future__ import annotations

from gradwatch.watchdog import metric_names as mn
from gradwatch.watchdog.alert import AlertState
from gradwatch.watchdog.engine import RuleEngine
from gradwatch.watchdog.rules.loader import load_rules
from gradwatch.watchdog.samples import SampleStore, build_labels

T0 = 1_700_000_000.0
RUN = build_labels({"run": "r1", "rank": "0"})


def run(series: dict[str, list[float]]) -> list[dict[str, str]]:
    """Evaluate the default pack every 2 s over the given scrapes; per evaluation, firing rule → severity."""
    engine = RuleEngine(load_rules().rules)
    store = SampleStore()
    out = []
    for i in range(max(len(v) for v in series.values())):
        t = T0 + 2.0 * i
        store.add(t, mn.STEP, RUN, 2.0 * i)
        for metric, values in series.items():
            if i < len(values):
                store.add(t, metric, RUN, values[i])
        engine.eval(t, store)
        out.append({a.rule: a.label("severity") for a in engine.alerts() if a.state is AlertState.FIRING})
    return out


def test_one_catastrophic_batch_held_by_the_guard_is_reported_at_warning():
    # 3.6e4x its median, held in one step: the run was saved, yet someone should look at that batch
    firing = run({mn.GUARD_HELD_RATIO_MAX: [0.0] * 10 + [3.6e4] + [0.0] * 100})
    assert "GuardRescue" not in firing[9]
    assert firing[10]["GuardRescue"] == "warning"
    assert all("GuardRescue" in f for f in firing[10:150])  # kept visible for 5 minutes (the gauge is 0 again)


def test_a_learning_transitions_jump_is_no_rescue():
    firing = run({mn.GUARD_HELD_RATIO_MAX: [0.0] * 10 + [65.0, 40.0, 20.0] + [0.0] * 20})
    assert not any("GuardRescue" in f for f in firing)


def test_a_guard_holding_most_steps_pages_critically_and_a_few_holds_do_not():
    held = run({mn.GUARD_HELD_FRACTION: [0.0] * 5 + [0.9] * 20})
    first = next(i for i, f in enumerate(held) if "GuardHoldingRun" in f)
    assert first == 5 + 5  # `for: 10s`: five evaluations after it began
    assert held[first]["GuardHoldingRun"] == "critical"
    assert not any("GuardHoldingRun" in f for f in run({mn.GUARD_HELD_FRACTION: [0.0] * 5 + [0.4] * 40}))
