"""The rule engine: conditions + state machines, failure containment, reloads and restarts."""

import pytest

from gradwatch.watchdog import metric_names as mn
from gradwatch.watchdog.alert import AlertState
from gradwatch.watchdog.engine import RuleEngine
from gradwatch.watchdog.rules import conditions
from gradwatch.watchdog.rules.loader import load_rules
from gradwatch.watchdog.samples import SampleStore, build_labels

INACTIVE, PENDING, FIRING = AlertState.INACTIVE, AlertState.PENDING, AlertState.FIRING

RULES = """
rules:
  - name: HighLoss
    kind: threshold
    metric: gradwatch_loss
    op: above
    value: 10
    for: 4s
    labels: {severity: warning}
    annotations: {summary: "loss {{ $value }} in {{ $labels.run }}"}
  - name: NormHigh
    kind: threshold
    metric: gradwatch_grad_norm
    op: above
    value: 100
"""


def rules(text: str = RULES):
    return load_rules(text).rules


def store_with(loss: dict[str, float], t: float, store: SampleStore | None = None) -> SampleStore:
    store = store or SampleStore()
    for run, v in loss.items():
        store.add(t, mn.LOSS, build_labels({"run": run, "rank": "0"}), v)
    return store


def by_rule(engine: RuleEngine) -> dict[str, list[tuple[str, AlertState]]]:
    out: dict[str, list] = {}
    for a in engine.alerts():
        out.setdefault(a.rule, []).append((a.label("run"), a.state))
    return out


def test_eval_runs_each_condition_through_its_state_machine():
    engine = RuleEngine(rules())
    s = store_with({"a": 50, "b": 1}, 0)
    r0 = engine.eval(0, s)
    assert [(a.rule, a.label("run"), a.state) for a in r0.changed] == [("HighLoss", "a", PENDING)]
    assert r0.fired == [] and r0.errors == {}
    engine.eval(2, store_with({"a": 50, "b": 1}, 2, s))
    r2 = engine.eval(4, store_with({"a": 60, "b": 1}, 4, s))
    (alert,) = r2.fired
    assert alert.labels == build_labels({"alertname": "HighLoss", "run": "a", "rank": "0", "severity": "warning"})
    assert alert.annotations == {"summary": "loss 60 in a"} and alert.value == 60
    r3 = engine.eval(6, store_with({"a": 1, "b": 1}, 6, s))
    assert [(a.label("run"), a.resolved_at) for a in r3.resolved] == [("a", 6)]


def test_a_failing_rule_is_contained_marked_unhealthy_and_keeps_its_alerts(monkeypatch):
    engine = RuleEngine(rules())
    s = store_with({"a": 50}, 0)
    s.add(0, mn.GRAD_NORM, build_labels({"run": "a", "rank": "0", "layer": "l"}), 500)
    engine.eval(0, s)
    assert by_rule(engine)["NormHigh"] == [("a", FIRING)]

    def broken(rule, store, now):
        raise RuntimeError("boom")

    monkeypatch.setitem(conditions.CONDITIONS, "threshold", broken)
    result = engine.eval(2, s)
    assert result.errors == {"HighLoss": "RuntimeError: boom", "NormHigh": "RuntimeError: boom"}
    health = engine.health()["NormHigh"]
    assert (health.state, health.last_error, health.errors_total) == ("err", "RuntimeError: boom", 1)
    # a broken evaluation neither fires nor resolves anything
    assert by_rule(engine) == {"HighLoss": [("a", PENDING)], "NormHigh": [("a", FIRING)]}
    engine.eval(4, s)
    assert engine.health()["NormHigh"].errors_total == 2

    monkeypatch.undo()
    engine.eval(6, s)
    health = engine.health()["NormHigh"]
    assert (health.state, health.last_error, health.errors_total) == ("ok", None, 2)
    assert health.last_eval_at == 6 and health.last_duration_s >= 0


def test_one_broken_rule_does_not_stop_the_others():
    # rule labels that overwrite `layer` make two series one label set: Prometheus refuses that vector
    text = RULES + """
  - name: Collides
    kind: threshold
    metric: gradwatch_grad_norm
    op: above
    value: 0
    labels: {layer: all}
"""
    engine = RuleEngine(rules(text))
    s = store_with({"a": 50}, 0)
    for layer in ("l1", "l2"):
        s.add(0, mn.GRAD_NORM, build_labels({"run": "a", "rank": "0", "layer": layer}), 500)
    result = engine.eval(0, s)
    assert list(result.errors) == ["Collides"]
    assert "share the label set" in result.errors["Collides"]
    assert engine.health()["HighLoss"].state == "ok"
    assert sorted(by_rule(engine)) == ["HighLoss", "NormHigh"]


def test_a_rule_over_its_limit_errors_and_reports_what_it_dropped():
    engine = RuleEngine(rules(RULES.replace("    value: 100\n", "    value: 100\n    limit: 1\n")))
    s = SampleStore()
    for layer in ("l1", "l2"):
        s.add(0, mn.GRAD_NORM, build_labels({"run": "a", "rank": "0", "layer": layer}), 500)
    result = engine.eval(0, s)
    assert "limit of 1" in result.errors["NormHigh"]
    assert len(result.dropped) == 2 and "NormHigh" not in by_rule(engine)


def test_replace_rules_keeps_the_state_of_unchanged_rules():
    engine = RuleEngine(rules())
    s = store_with({"a": 50}, 0)
    for t in (0, 2, 4):
        engine.eval(t, store_with({"a": 50}, t, s))
    (before,) = engine.alerts()
    engine.replace_rules(rules())  # a reload of the same file
    result = engine.eval(6, store_with({"a": 50}, 6, s))
    (after,) = engine.alerts()
    assert result.changed == []
    assert (after.state, after.active_at, after.fired_at) == (FIRING, before.active_at, before.fired_at)


def test_a_changed_rule_with_the_same_name_takes_over_its_alerts():
    engine = RuleEngine(rules())
    s = SampleStore()
    for t in (0, 2, 4):
        engine.eval(t, store_with({"a": 50, "b": 12}, t, s))
    assert sorted(by_rule(engine)["HighLoss"]) == [("a", FIRING), ("b", FIRING)]
    engine.replace_rules(rules(RULES.replace("value: 10\n", "value: 20\n")))
    result = engine.eval(6, store_with({"a": 50, "b": 12}, 6, s))
    # still true: keeps firing without re-pending; no longer true: resolves (and will be sent)
    assert sorted(by_rule(engine)["HighLoss"]) == [("a", FIRING), ("b", INACTIVE)]
    assert [a.label("run") for a in result.resolved] == ["b"]


def test_alerts_of_removed_rules_resolve_so_the_resolution_is_sent():
    engine = RuleEngine(rules())
    s = SampleStore()
    for t in (0, 2, 4):
        engine.eval(t, store_with({"a": 50}, t, s))
    engine.alerts_to_send(4)
    engine.replace_rules(rules(RULES.split("  - name: NormHigh")[0].replace("HighLoss", "Renamed")))
    result = engine.eval(6, store_with({"a": 50}, 6, s))
    assert [(a.rule, a.state) for a in result.resolved] == [("HighLoss", INACTIVE)]
    sent = engine.alerts_to_send(6)
    assert [(a.rule, a.state) for a in sent] == [("HighLoss", INACTIVE)]
    assert engine.health().keys() == {"Renamed"}
    engine.eval(6 + 901, SampleStore())
    assert [a.rule for a in engine.alerts()] == []


def test_replace_rules_refuses_duplicate_names_and_keeps_the_old_rules():
    engine = RuleEngine(rules())
    dup = rules()[:1] * 2
    with pytest.raises(ValueError, match="HighLoss"):
        engine.replace_rules(dup)
    assert [r.name for r in engine.rules] == ["HighLoss", "NormHigh"]


def test_restore_after_a_restart_keeps_firing_alerts_firing():
    first = RuleEngine(rules())
    s = SampleStore()
    for t in (0, 2, 4):
        first.eval(t, store_with({"a": 50}, t, s))
    first.alerts_to_send(4)
    saved = first.alerts()

    second = RuleEngine(rules())
    assert second.restore(saved) == 1
    result = second.eval(6, store_with({"a": 50}, 6, s))
    assert result.changed == [] and by_rule(second) == {"HighLoss": [("a", FIRING)]}
    assert second.alerts_to_send(6) == []  # it was sent just before the restart
    assert len(second.alerts_to_send(4 + 61)) == 1


def test_restored_alerts_of_rules_no_longer_loaded_resolve_at_the_next_eval():
    first = RuleEngine(rules())
    first.eval(0, store_with({"a": 50}, 0))
    first.eval(4, store_with({"a": 50}, 4))
    second = RuleEngine(rules(RULES.split("  - name: NormHigh")[0].replace("HighLoss", "Other")))
    second.restore(first.alerts())
    result = second.eval(6, SampleStore())
    assert [(a.rule, a.state) for a in result.resolved] == [("HighLoss", INACTIVE)]
