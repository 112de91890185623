"""The alert state machine, stepped with a fake clock like prometheus rules/alerting_test.go."""

import math

import pytest

from gradwatch.watchdog.alert import AlertState
from gradwatch.watchdog.alerting import (
    AlertingRule,
    AlertLimitExceeded,
    DuplicateLabelsError,
    TemplateError,
    compile_template,
    humanize,
    needs_sending,
)
from gradwatch.watchdog.rules.conditions import Match
from gradwatch.watchdog.samples import build_labels

INACTIVE, PENDING, FIRING = AlertState.INACTIVE, AlertState.PENDING, AlertState.FIRING


def match(layer: str = "fc1.weight", value: float = 1.0) -> Match:
    return Match(build_labels({"alertname": "R", "run": "r1", "layer": layer}), value)


def only(rule: AlertingRule):
    (alert,) = rule.alerts()
    return alert


def states(rule: AlertingRule) -> dict[str, AlertState]:
    return {a.label("layer"): a.state for a in rule.alerts()}


def test_for_zero_fires_at_the_first_match():
    rule = AlertingRule("R")
    changes = rule.eval(0.0, [match()])
    assert [a.state for a in changes.changed] == [FIRING]
    a = only(rule)
    assert (a.active_at, a.fired_at, a.rule) == (0.0, 0.0, "R")


def test_pending_until_for_has_elapsed_then_firing():
    rule = AlertingRule("R", for_s=30)
    for t in (0, 10, 20):
        rule.eval(t, [match()])
        assert only(rule).state == PENDING, t
    changes = rule.eval(30, [match()])
    a = only(rule)
    assert a.state == FIRING and a.active_at == 0 and a.fired_at == 30
    assert [c.state for c in changes.changed] == [FIRING]
    assert rule.eval(40, [match()]).changed == []  # no change while it keeps firing


def test_pending_alert_whose_condition_clears_is_dropped_silently():
    rule = AlertingRule("R", for_s=30)
    rule.eval(0, [match()])
    changes = rule.eval(10, [])
    assert rule.alerts() == []
    assert [a.state for a in changes.dropped] == [PENDING]
    assert changes.changed == []
    # and it starts over: a new pending alert with a new active_at
    rule.eval(20, [match()])
    assert only(rule).active_at == 20


def test_firing_alert_resolves_and_is_kept_for_the_retention_then_dropped():
    rule = AlertingRule("R", resolved_retention_s=900)
    rule.eval(0, [match()])
    changes = rule.eval(10, [])
    a = only(rule)
    assert a.state == INACTIVE and a.resolved_at == 10
    assert [c.state for c in changes.changed] == [INACTIVE]
    rule.eval(910, [])  # exactly the retention: still kept (Prometheus drops when older)
    assert len(rule.alerts()) == 1
    changes = rule.eval(911, [])
    assert rule.alerts() == [] and len(changes.dropped) == 1


def test_condition_returning_after_resolution_starts_a_new_alert():
    rule = AlertingRule("R", for_s=20)
    rule.eval(0, [match()])
    rule.eval(20, [match()])
    rule.eval(30, [])
    assert only(rule).state == INACTIVE
    changes = rule.eval(40, [match()])
    a = only(rule)
    assert a.state == PENDING and a.active_at == 40 and a.resolved_at is None and a.fired_at is None
    assert [c.state for c in changes.changed] == [PENDING]


def test_keep_firing_for_holds_a_firing_alert_after_its_condition_clears():
    rule = AlertingRule("R", keep_firing_for_s=30)
    rule.eval(0, [match()])
    for t in (10, 20, 30):
        rule.eval(t, [])
        assert only(rule).state == FIRING, t
        assert only(rule).keep_firing_since == 10
    rule.eval(40, [])  # 30 s after the condition cleared
    assert only(rule).state == INACTIVE and only(rule).resolved_at == 40


def test_keep_firing_for_restarts_when_the_condition_returns():
    rule = AlertingRule("R", keep_firing_for_s=30)
    rule.eval(0, [match()])
    rule.eval(10, [])
    rule.eval(20, [match()])
    assert only(rule).keep_firing_since is None
    rule.eval(30, [])
    rule.eval(50, [])
    assert only(rule).state == FIRING  # only 20 s since it cleared again
    rule.eval(60, [])
    assert only(rule).state == INACTIVE


def test_keep_firing_for_does_not_apply_to_pending_alerts():
    rule = AlertingRule("R", for_s=60, keep_firing_for_s=30)
    rule.eval(0, [match()])
    rule.eval(10, [])
    assert rule.alerts() == []


def test_label_sets_are_independent():
    rule = AlertingRule("R", for_s=10)
    rule.eval(0, [match("a")])
    rule.eval(10, [match("a"), match("b")])
    assert states(rule) == {"a": FIRING, "b": PENDING}
    rule.eval(20, [match("b")])
    assert states(rule) == {"a": INACTIVE, "b": FIRING}


def test_value_and_annotations_follow_the_latest_match():
    rule = AlertingRule("R", annotations={"summary": "{{ $labels.layer }} at {{ $value }}"})
    rule.eval(0, [match(value=2.0)])
    rule.eval(10, [match(value=960.0)])
    a = only(rule)
    assert a.value == 960.0 and a.annotations == {"summary": "fc1.weight at 960"}
    rule.eval(20, [])
    assert only(rule).value == 960.0  # a resolved alert keeps its last value


def test_limit_exceeded_fails_the_evaluation_and_forgets_every_alert():
    rule = AlertingRule("R", limit=2)
    rule.eval(0, [match("a"), match("b")])
    with pytest.raises(AlertLimitExceeded) as info:
        rule.eval(10, [match("a"), match("b"), match("c")])
    assert info.value.count == 3 and len(info.value.dropped) == 3
    assert rule.alerts() == []


def test_duplicate_label_sets_fail_before_touching_state():
    rule = AlertingRule("R")
    rule.eval(0, [match("a")])
    with pytest.raises(DuplicateLabelsError):
        rule.eval(10, [match("b"), match("b")])
    assert states(rule) == {"a": FIRING}


# --- sending ---------------------------------------------------------------------------------


def test_needs_sending_never_for_pending_and_at_once_for_new_firing():
    rule = AlertingRule("R", for_s=10)
    rule.eval(0, [match()])
    assert not needs_sending(only(rule), 0, 60)
    rule.eval(10, [match()])
    assert needs_sending(only(rule), 10, 60)


def test_firing_alerts_are_resent_after_the_resend_delay():
    rule = AlertingRule("R")
    rule.eval(0, [match()])
    assert len(rule.alerts_to_send(0, 60)) == 1
    assert only(rule).last_sent_at == 0
    assert rule.alerts_to_send(30, 60) == []
    assert rule.alerts_to_send(60, 60) == []  # strictly after the delay, as Prometheus
    assert len(rule.alerts_to_send(61, 60)) == 1


def test_a_resolution_is_sent_at_once_even_right_after_a_send():
    rule = AlertingRule("R")
    rule.eval(0, [match()])
    rule.alerts_to_send(0, 60)
    rule.eval(2, [])
    sent = rule.alerts_to_send(2, 60)
    assert [(a.state, a.resolved_at) for a in sent] == [(INACTIVE, 2)]
    assert rule.alerts_to_send(4, 60) == []


def test_alerts_are_copies_that_cannot_change_the_rule():
    rule = AlertingRule("R")
    rule.eval(0, [match()])
    a = only(rule)
    a.state = INACTIVE
    a.annotations["x"] = "y"
    assert only(rule).state == FIRING and only(rule).annotations == {}


# --- restore ------------------------------------------------------------------------------------


def test_restore_keeps_firing_alerts_firing_and_pending_ones_on_their_clock():
    before = AlertingRule("R", for_s=60)
    before.eval(0, [match("a")])
    before.eval(60, [match("a"), match("b")])
    saved = before.alerts()

    after = AlertingRule("R", for_s=60)
    assert after.restore(saved) == 2
    changes = after.eval(100, [match("a"), match("b")])
    assert changes.changed == []  # nothing re-pends, nothing re-fires
    assert states(after) == {"a": FIRING, "b": PENDING}
    after.eval(120, [match("a"), match("b")])
    assert states(after) == {"a": FIRING, "b": FIRING}
    assert {a.label("layer"): a.fired_at for a in after.alerts()} == {"a": 60, "b": 120}


def test_restore_ignores_other_rules_and_restored_firing_alerts_resolve_normally():
    before = AlertingRule("R")
    before.eval(0, [match()])
    other = AlertingRule("Other")
    other.eval(0, [match()])
    after = AlertingRule("R")
    assert after.restore(before.alerts() + other.alerts()) == 1
    after.eval(5, [])
    assert only(after).state == INACTIVE and needs_sending(only(after), 5, 60)


# --- templates ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, value, expected",
    [
        ("{{ $value }}", 960.0, "960"),
        ("{{ $value }}", 1e-7, "1e-07"),
        ("{{ $value }}", 1234567.0, "1.234567e+06"),
        ("{{ $value }}", math.nan, "NaN"),
        ("{{ $value }}", math.inf, "+Inf"),
        ("{{ $value | humanize }}", 0.00123, "1.23m"),
        ("{{ $value | humanize }}", 1234.0, "1.234k"),
        ("{{ $value | humanizePercentage }}", 0.005, "0.5%"),
        ('{{ printf "%.2f" $value }}', 3.14159, "3.14"),
        ('{{ $value | printf "%.1e" }}', 960.0, "9.6e+02"),
        ("layer {{ $labels.layer }}, run {{$labels.run}}", 0.0, "layer fc1.weight, run r1"),
        ("missing '{{ $labels.nope }}'", 0.0, "missing ''"),
        ("a {{- $labels.run -}} b", 0.0, "ar1b"),
        ("no template", 0.0, "no template"),
    ],
)
def test_templates_expand_like_prometheus(template, value, expected):
    assert compile_template(template)({"layer": "fc1.weight", "run": "r1"}, value) == expected


@pytest.mark.parametrize(
    "bad", ["{{ $foo }}", "{{ $value | nope }}", "{{ unclosed", '{{ printf "%d %d" $value }}', "{{ }}"]
)
def test_unsupported_templates_are_refused_when_compiled(bad):
    with pytest.raises(TemplateError):
        compile_template(bad)


def test_humanize_matches_prometheus_examples():
    values = (0.0, 1.0, 999.0, 1000.0, 1e6, 0.5, 2e-9)
    assert [humanize(v) for v in values] == ["0", "1", "999", "1k", "1M", "500m", "2n"]
