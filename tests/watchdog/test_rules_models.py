"""The rules file format: what loads, and how a bad file is reported (location, line, reason)."""

import textwrap

import pytest
from pydantic import BaseModel, ValidationError

from gradwatch.watchdog.rules.loader import RulesError, load_rules, validation_problems
from gradwatch.watchdog.rules.models import (
    BandRule,
    NonFiniteRule,
    RulesFile,
    SpikeRule,
    format_duration,
    parse_duration,
)

EVERY_KIND = """
rules:
  - name: GradNormHuge
    kind: threshold
    metric: gradwatch_grad_global_norm
    op: above
    value: 1.0e4
    for: 30s
    labels: {severity: warning}
    annotations:
      summary: "norm {{ $value }} in {{ $labels.run }}"
  - name: NonFinite
    kind: nonfinite
  - name: RatioBand
    kind: band
    lo: -4
    hi: -1
    side: both
    layer_pattern: "encoder\\\\..*weight"
    match: {run: exp42}
  - name: LossZ
    kind: spike
    metric: gradwatch_loss
    mode: zscore
    z: 6
    window: 5m
    min_samples: 128
    keep_firing_for: 1m
  - name: Vanishing
    kind: depth
    bound: -8
  - name: Plateau
    kind: plateau
    window: 15m
    rel_range: 0.005
    max_update_ratio: 1.0e-7
  - name: Stalled
    kind: stall
    window: 1h30m
    forget_after: 1d
"""


def problems_of(text: str) -> list[tuple[str, int | None, str]]:
    with pytest.raises(RulesError) as info:
        load_rules(textwrap.dedent(text))
    return [(p.location, p.line, p.reason) for p in info.value.problems]


# --- durations ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("0", 0), (0, 0), ("30s", 30), ("5m", 300), ("1h30m", 5400), ("500ms", 0.5),
        ("1d", 86400), ("2w", 1209600), ("1y", 31536000),
    ],
)
def test_prometheus_durations_parse_to_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", 5, 1.5, "5 m", "1m1h", "-5s", "1.5m", "5min", True, None])
def test_invalid_durations_are_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    "seconds, text", [(0, "0s"), (30, "30s"), (5400, "1h30m"), (0.5, "500ms"), (90061, "1d1h1m1s")]
)
def test_durations_format_back_to_the_shortest_form(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


# --- valid files ----------------------------------------------------------------------------------------


def test_every_kind_loads_with_its_parameters():
    rules = {r.name: r for r in load_rules(EVERY_KIND).rules}
    assert [r.kind for r in rules.values()] == ["threshold", "nonfinite", "band", "spike", "depth", "plateau", "stall"]
    assert rules["GradNormHuge"].for_ == 30 and rules["GradNormHuge"].value == 1e4
    assert rules["RatioBand"].layer_pattern == r"encoder\..*weight" and rules["RatioBand"].match == {"run": "exp42"}
    assert rules["LossZ"].keep_firing_for == 60 and rules["LossZ"].z == 6
    assert rules["Stalled"].window == 5400 and rules["Stalled"].forget_after == 86400


def test_one_line_nonfinite_rule_covers_skipped_steps_nan_counters_and_nan_gauges():
    rule = load_rules("rules:\n  - {name: N, kind: nonfinite}\n").rules[0]
    assert isinstance(rule, NonFiniteRule)
    assert [(c.metric, c.match) for c in rule.counters] == [
        ("gradwatch_skipped_steps_total", {"reason": "nonfinite"}),
        ("gradwatch_nonfinite_grads_total", {}),
    ]
    assert {g.metric for g in rule.gauges} >= {"gradwatch_loss", "gradwatch_grad_global_norm"}


def test_defaults_follow_the_field():
    band = BandRule(name="B", kind="band")
    assert (band.lo, band.hi, band.side, band.layer_pattern) == (-4, -2, "both", ".*weight")  # DL4J's band, weights


def test_rules_can_be_built_in_python_and_dumped_back_to_yaml_form():
    rule = SpikeRule(name="S", kind="spike", metric="gradwatch_loss", window="5m", factor=2, for_="10s")
    dumped = rule.model_dump(by_alias=True)
    assert dumped["for"] == "10s" and dumped["window"] == "5m"
    assert SpikeRule.model_validate(dumped) == rule


def test_equal_definitions_compare_equal():
    a, b = load_rules(EVERY_KIND), load_rules(EVERY_KIND)
    assert a.rules == b.rules
    changed = load_rules(EVERY_KIND.replace("bound: -8", "bound: -9"))
    assert [x == y for x, y in zip(a.rules, changed.rules)] == [True, True, True, True, False, True, True]


def test_load_rules_reads_files_and_defaults_to_the_built_in_pack(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(EVERY_KIND)
    assert len(load_rules(path).rules) == 7
    assert len(load_rules(str(path)).rules) == 7
    assert {r.name for r in load_rules().rules} >= {"GradNonFinite", "GradNormSpike"}


def test_an_empty_rules_list_is_valid():
    assert load_rules("rules: []\n").rules == []


# --- problems, located ------------------------------------------------------------------------------


def test_problems_name_the_yaml_path_the_line_and_the_reason():
    got = problems_of(
        """\
        rules:
          - name: Ok
            kind: stall
          - name: Bad
            kind: threshold
            metric: gradwatch_loss
            op: abvoe
            value: high
            for: 5 min
            treshold: 3
        """
    )
    assert [(loc, line) for loc, line, _ in got] == [
        ("rules[1].op", 7), ("rules[1].value", 8), ("rules[1].for", 9), ("rules[1].treshold", 10),
    ]
    reasons = [r for *_, r in got]
    assert "'above' or 'below'" in reasons[0] and "'abvoe'" in reasons[0]
    assert "valid number" in reasons[1]
    assert "invalid duration '5 min'" in reasons[2] and "30s" in reasons[2]
    assert reasons[3].startswith("unknown key 'treshold'") and "metric, op, value" in reasons[3]


@pytest.mark.parametrize(
    "rule_yaml, location, reason",
    [
        ("{name: A, kind: band, lo: -1, hi: -2}", "rules[0].hi", "lo (-1) must be below hi (-2)"),
        ("{name: A, kind: band, layer_pattern: '('}", "rules[0].layer_pattern", "invalid regular expression '('"),
        ("{name: A, kind: spike, metric: m, window: 1m}", "rules[0].factor", "mode ratio needs factor"),
        ("{name: A, kind: spike, metric: m, window: 1m, mode: zscore, z: 3, factor: 2}", "rules[0].factor", "not used"),
        ("{name: A, kind: spike, metric: m, window: 0, factor: 2}", "rules[0].window", "greater than 0"),
        ("{name: A, kind: nope}", "rules[0].kind", "unknown kind 'nope'"),
        ("{name: A}", "rules[0].kind", "missing `kind`"),
        ("{kind: stall}", "rules[0].name", "required key is missing"),
        ("{name: 'has space', kind: stall}", "rules[0].name", "should match pattern"),
        ("{name: A, kind: threshold, metric: 'bad-name', op: above, value: 1}", "rules[0].metric", "match pattern"),
        ("{name: A, kind: stall, labels: {alertname: x}}", "rules[0].labels.alertname", "reserved"),
        ("{name: A, kind: stall, labels: {severity: 1}}", "rules[0].labels.severity", "valid string"),
        ("{name: A, kind: stall, annotations: {summary: '{{ $foo }}'}}", "rules[0].annotations.summary", "$labels"),
        ("{name: A, kind: stall, window: 2h}", "rules[0].forget_after", "longer than window"),
        ("{name: A, kind: threshold, metric: m, op: above, value: .nan}", "rules[0].value", "finite"),
    ],
)
def test_each_kind_of_mistake_is_located(rule_yaml, location, reason):
    ((loc, line, why),) = problems_of(f"rules:\n  - {rule_yaml}\n")
    assert (loc, line) == (location, 2)
    assert reason in why


def test_duplicate_rule_names_are_reported_beside_other_problems():
    got = problems_of(
        """\
        rules:
          - {name: A, kind: stall}
          - {name: A, kind: stall, window: nope}
          - {name: A, kind: depth}
        """
    )
    assert [(loc, line) for loc, line, _ in got] == [("rules[1].name", 3), ("rules[1].window", 3), ("rules[2].name", 4)]
    assert "duplicate rule name 'A' (first used by rules[0])" in got[0][2]


def test_duplicate_rule_names_alone():
    ((loc, line, why),) = problems_of("rules:\n  - {name: A, kind: stall}\n  - {name: A, kind: depth}\n")
    assert (loc, line) == ("rules[1].name", 3) and "duplicate rule name" in why


def test_duplicate_yaml_keys_are_refused():
    ((loc, line, why),) = problems_of("rules:\n  - name: A\n    kind: stall\n    window: 5m\n    window: 10m\n")
    assert (loc, line) == ("rules[0].window", 5) and "first on line 4" in why


@pytest.mark.parametrize(
    "text, location",
    [("\n", "<root>"), ("- a\n- b\n", "<root>"), ("{}\n", "rules"), ("rules: {}\n", "rules"), ("rulez: []\n", "rules")],
)
def test_wrong_top_level_shapes(text, location):
    assert location in [loc for loc, *_ in problems_of(text)]


def test_yaml_syntax_errors_carry_their_line():
    ((loc, line, why),) = problems_of("rules:\n  - name: A\n    kind: [stall\n")
    assert loc == "<yaml>" and line is not None and why.startswith("not valid YAML")


def test_missing_file():
    with pytest.raises(RulesError) as info:
        load_rules("/nonexistent/rules.yaml")
    assert "cannot read" in str(info.value)


def test_the_report_is_readable_multi_line_text():
    with pytest.raises(RulesError) as info:
        load_rules("rules:\n  - {name: A, kind: band, lo: 1, hi: 0}\n  - {name: B, kind: stall, for: x}\n")
    assert str(info.value).splitlines() == [
        "<string>: 2 problems",
        "  rules[0].hi (line 2): lo (1) must be below hi (0)",
        "  rules[1].for (line 3): invalid duration 'x': use a Prometheus duration like 30s, 5m, 1h30m or 0",
    ]


def test_validation_problems_locates_rules_inside_a_larger_config():
    class Config(BaseModel):
        scrape_interval: float = 2.0
        alerting: RulesFile

    text = "scrape_interval: 2\nalerting:\n  rules:\n    - name: A\n      kind: stall\n      window: soon\n"
    import yaml

    with pytest.raises(ValidationError) as info:
        Config.model_validate(yaml.safe_load(text))
    (p,) = validation_problems(info.value, text)
    assert (p.location, p.line) == ("alerting.rules[0].window", 6)
    assert "invalid duration 'soon'" in p.reason
