"""A restart must not resolve what the watchdog merely cannot see yet.

The sample windows are in memory and start empty after a restart; a restored firing
alert of a rule over a window (a counter's increase, a stall) is kept firing until
that window has refilled, unless its condition is seen again first. Rules reading
only current values get no hold: the first scrape answers them.
"""

from gradwatch.watchdog import metric_names as mn
from gradwatch.watchdog.alert import AlertState
from gradwatch.watchdog.engine import RuleEngine, restore_hold_s
from gradwatch.watchdog.rules.loader import load_rules
from gradwatch.watchdog.samples import SampleStore, build_labels

RULES = """
rules:
  - name: Skipped
    kind: nonfinite
    window: 1m
    anchor: null
    counters: [{metric: gradwatch_skipped_steps_total}]
    gauges: []
  - name: LossHigh
    kind: threshold
    metric: gradwatch_loss
    op: above
    value: 10
"""
RUN = {"run": "r1", "rank": "0"}
T0 = 1_000_000.0


def engine() -> RuleEngine:
    return RuleEngine(load_rules(RULES).rules)


def fired_before_restart() -> list:
    """Both rules firing for r1, as the store would hold them when the watchdog died."""
    before, store = engine(), SampleStore()
    store.add(T0, mn.SKIPPED_STEPS_TOTAL, build_labels(RUN), 0.0)
    store.add(T0, mn.LOSS, build_labels(RUN), 50.0)
    before.eval(T0, store)
    store.add(T0 + 2, mn.SKIPPED_STEPS_TOTAL, build_labels(RUN), 3.0)
    before.eval(T0 + 2, store)
    alerts = before.alerts()
    assert sorted((a.rule, a.state) for a in alerts) == [("LossHigh", AlertState.FIRING), ("Skipped", AlertState.FIRING)]
    return alerts


def states(e: RuleEngine) -> dict[str, AlertState]:
    return {a.rule: a.state for a in e.alerts()}


def test_the_hold_is_the_rules_window():
    skipped, loss_high = load_rules(RULES).rules
    assert (restore_hold_s(skipped), restore_hold_s(loss_high)) == (60.0, 0.0)


def test_a_windowed_alert_stays_firing_until_its_window_refilled():
    after = engine()
    after.restore(fired_before_restart())
    store = SampleStore()
    t = T0 + 100  # restarted; the counter no longer moves, the loss is back to normal
    for dt in (0, 2, 30, 59):
        store.add(t + dt, mn.SKIPPED_STEPS_TOTAL, build_labels(RUN), 3.0)
        store.add(t + dt, mn.LOSS, build_labels(RUN), 1.0)
        result = after.eval(t + dt, store)
        if dt == 0:
            assert [(a.rule, a.state) for a in result.resolved] == [("LossHigh", AlertState.INACTIVE)]  # no hold
        assert states(after)["Skipped"] == AlertState.FIRING
    store.add(t + 61, mn.SKIPPED_STEPS_TOTAL, build_labels(RUN), 3.0)
    assert [a.rule for a in after.eval(t + 61, store).resolved] == ["Skipped"]


def test_seeing_the_condition_again_ends_the_hold():
    after = engine()
    after.restore(fired_before_restart())
    store = SampleStore()
    t = T0 + 100
    store.add(t, mn.SKIPPED_STEPS_TOTAL, build_labels(RUN), 3.0)
    after.eval(t, store)
    store.add(t + 2, mn.SKIPPED_STEPS_TOTAL, build_labels(RUN), 5.0)  # a new event: confirmed
    assert after.eval(t + 2, store).changed == []
    (alert,) = [a for a in after.alerts() if a.rule == "Skipped"]
    assert alert.fired_at == T0 + 2  # the same episode, not a new one
    # From now on ordinary semantics: once the increase leaves the window, it resolves.
    store.add(t + 63, mn.SKIPPED_STEPS_TOTAL, build_labels(RUN), 5.0)
    store.add(t + 64, mn.SKIPPED_STEPS_TOTAL, build_labels(RUN), 5.0)
    assert [a.rule for a in after.eval(t + 64, store).resolved] == ["Skipped"]


def test_a_reload_keeps_the_hold():
    after = engine()
    after.restore(fired_before_restart())
    store = SampleStore()
    t = T0 + 100
    store.add(t, mn.SKIPPED_STEPS_TOTAL, build_labels(RUN), 3.0)
    after.eval(t, store)
    # Same name and labels, another annotation: the new rule adopts the alerts (and their hold).
    after.replace_rules(load_rules(RULES.replace("gauges: []", "gauges: []\n    annotations: {summary: x}")).rules)
    assert after.eval(t + 10, store).resolved == []
    assert states(after)["Skipped"] == AlertState.FIRING
