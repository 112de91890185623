"""The PromQL text each rule kind exports to, the rule file around it, and the export command.

That the PromQL *means* what the engine computes is proven against promtool in
tests/integration/test_rule_export.py; these tests pin the text and the file's shape.
"""

from __future__ import annotations

import argparse

import pytest
import yaml
from pydantic import TypeAdapter

from gradwatch.watchdog.remediation import spec_from_labels
from gradwatch.watchdog.rules.export_cli import export_command
from gradwatch.watchdog.rules.loader import load_rules
from gradwatch.watchdog.rules.models import Rule, RulesFile
from gradwatch.watchdog.rules.promql import (
    NotExportable,
    action_labels,
    export_rule,
    export_rules,
    rule_expr,
    selector,
)
from gradwatch.watchdog.schema import EnableClipping, LowerLR

RULE = TypeAdapter(Rule)


def rule(kind: str, **fields) -> Rule:
    return RULE.validate_python({"name": "R", "kind": kind, **fields})


def export(*rules: Rule, **kw) -> tuple[dict, list]:
    text, unsupported = export_rules(RulesFile(rules=list(rules)), **kw)
    return yaml.safe_load(text), unsupported


# --- PromQL per kind ---------------------------------------------------------------------------


def test_threshold():
    assert rule_expr(rule("threshold", metric="gradwatch_loss", op="above", value=10)) == "gradwatch_loss > 10"
    below = rule("threshold", metric="gradwatch_grad_abs_mean", op="below", value=1e-7, match={"rank": "0"})
    assert rule_expr(below) == 'gradwatch_grad_abs_mean{rank="0"} < 1e-07'


def test_nonfinite_per_series_without_anchor():
    r = rule(
        "nonfinite", window="30s", anchor=None,
        counters=[{"metric": "gradwatch_skipped_steps_total", "match": {"reason": "nonfinite"}}],
        gauges=[{"metric": "gradwatch_loss"}],
    )
    assert rule_expr(r) == (
        '(increase(gradwatch_skipped_steps_total{reason="nonfinite"}[30s]) > 0)\n'
        "or\n"
        "(gradwatch_loss != gradwatch_loss or gradwatch_loss == +Inf or gradwatch_loss == -Inf)"
    )


def test_nonfinite_anchored_summed_by_run_and_rank_with_min_increase():
    r = rule(
        "nonfinite", window="1m", by=["run", "rank"], min_increase=2, match={"run": "r1"},
        counters=[{"metric": "gradwatch_nonfinite_grads_total"}], gauges=[],
    )
    c = 'gradwatch_nonfinite_grads_total{run="r1"}'
    assert rule_expr(r) == (
        "sum by (run, rank) (\n"
        f"  increase({c}[1m]) > 0\n"
        f'  or ({c} > 0 unless {c} offset 1m) and on(run, rank) gradwatch_step{{run="r1"}} offset 1m\n'
        ") > 2"
    )


def test_band_sides():
    sel = 'log10(gradwatch_update_ratio{layer=~".*weight"})'
    assert rule_expr(rule("band")) == f"{sel} > -2\nor\n{sel} < -4"
    assert rule_expr(rule("band", side="above", hi=0)) == f"{sel} > 0"
    assert rule_expr(rule("band", side="below", lo=-5.5, hi=-1)) == f"{sel} < -5.5"


def test_spike_ratio_and_zscore():
    r = rule("spike", metric="gradwatch_loss", factor=2, window="5m", min_samples=60)
    s = "gradwatch_loss[5m]"
    mean = f"(sum_over_time({s}) - last_over_time({s})) / (count_over_time({s}) - 1)"
    assert rule_expr(r) == (
        f"last_over_time({s}) / ({mean}) >= 2\nand {mean} > 0\nand count_over_time({s}) >= 60"
    )
    z = rule("spike", metric="gradwatch_loss", mode="zscore", z=3.5, window="5m")
    assert rule_expr(z) == (
        f"(last_over_time({s}) - avg_over_time({s})) / stddev_over_time({s}) >= 3.5\nand count_over_time({s}) >= 10"
    )


def test_depth():
    m, d = 'gradwatch_grad_abs_mean{layer=~".*weight"}', 'gradwatch_layer_depth{layer=~".*weight"}'
    c = f"({d} > -Inf < +Inf and {m} > 0 < +Inf)"
    assert rule_expr(rule("depth", bound=-6)) == (
        f'max without(layer) (label_replace(log10({m}) and bottomk without(layer) (1, {c}), "first_layer", "$1", "layer", "(.*)"))\n'
        "- ignoring(first_layer, last_layer) group_left(last_layer)\n"
        f'max without(layer) (label_replace(log10({m}) and topk without(layer) (1, {c}), "last_layer", "$1", "layer", "(.*)"))\n'
        "< -6"
    )


def test_plateau():
    s = "gradwatch_loss[10m]"
    assert rule_expr(rule("plateau", min_samples=150)) == (
        f"(max_over_time({s}) - min_over_time({s})) / abs(sum_over_time({s}) / count_over_time({s})) < 0.01\n"
        f"and count_over_time({s}) >= 150\n"
        'and max without(layer) (gradwatch_update_ratio{layer=~".*weight"}) < 1e-06'
    )


def test_stall_with_and_without_the_silent_branch():
    unchanged = "(last_over_time(gradwatch_step[10m]) and changes(gradwatch_step[10m]) == 0 and gradwatch_step offset 10m)"
    assert rule_expr(rule("stall", stale=False)) == unchanged
    assert rule_expr(rule("stall", window="10m", forget_after="1h30m")) == (
        f"{unchanged}\nor\n(last_over_time(gradwatch_step[1h30m]) unless count_over_time(gradwatch_step[10m]))"
    )


def test_selector_quotes_values_as_go_strings():
    assert selector("m", {"a": 'x"y\\z', "b": "line\nbreak"}, {"layer": r"enc\.\d+"}) == (
        'm{a="x\\"y\\\\z", b="line\\nbreak", layer=~"enc\\\\.\\\\d+"}'
    )
    assert selector("m", {}) == "m"


# --- the rule file ------------------------------------------------------------------------------


def test_rule_fields_durations_labels_and_annotations():
    r = rule(
        "threshold", metric="gradwatch_loss", op="above", value=10, **{"for": "90s"}, keep_firing_for="5m",
        labels={"severity": "critical"}, annotations={"summary": "loss {{ $value }} in {{ $labels.run }}"},
    )
    assert export_rule(r) == {
        "alert": "R", "expr": "gradwatch_loss > 10", "for": "1m30s", "keep_firing_for": "5m",
        "labels": {"severity": "critical"}, "annotations": {"summary": "loss {{ $value }} in {{ $labels.run }}"},
    }
    assert export_rule(rule("threshold", metric="m", op="above", value=1)) == {"alert": "R", "expr": "m > 1"}


def test_label_values_stay_literal_where_prometheus_would_expand_templates():
    r = rule("threshold", metric="m", op="above", value=1, labels={"note": "{{ $value }} is literal"})
    assert export_rule(r)["labels"] == {"note": '{{ "{{" }} $value }} is literal'}


def test_groups_interval_and_limit():
    doc, unsupported = export(
        rule("threshold", metric="m", op="above", value=1),
        RULE.validate_python({"name": "Limited", "kind": "stall", "limit": 20}),
        interval="500ms", group="training",
    )
    assert unsupported == []
    assert [(g["name"], g["interval"], g.get("limit"), [r["alert"] for r in g["rules"]]) for g in doc["groups"]] == [
        ("training", "500ms", None, ["R"]),
        ("training-limit-20", "500ms", 20, ["Limited"]),
    ]


def test_interval_as_seconds_or_duration():
    assert export(rule("stall"), interval=0.5)[0]["groups"][0]["interval"] == "500ms"
    assert export(rule("stall"), interval="1m")[0]["groups"][0]["interval"] == "1m"
    with pytest.raises(ValueError, match="positive"):
        export(rule("stall"), interval=0)


def test_multi_line_expressions_are_literal_blocks():
    text, _ = export_rules(RulesFile(rules=[rule("stall")]))
    assert "expr: |-\n" in text and text.startswith("# Generated by `gradwatch rules export")


def test_the_default_pack_exports_every_rule():
    doc, unsupported = export(*load_rules().rules)
    # Only notes on multi-step policies: every rule itself is exported.
    assert unsupported and all("on_fire" in u.reason for u in unsupported)
    assert [r["alert"] for r in doc["groups"][0]["rules"]] == [r.name for r in load_rules().rules]


# --- remediation labels --------------------------------------------------------------------------


def test_first_on_fire_step_becomes_action_labels():
    r = rule(
        "threshold", metric="m", op="above", value=1, labels={"severity": "critical"},
        on_fire=[
            {"action": "lower_lr", "factor": 0.5, "min_lr": 1e-5},
            {"action": "stop", "after": "1m"},
        ],
    )
    labels = export_rule(r)["labels"]
    assert labels == {
        "severity": "critical", "gradwatch_action": "lower_lr", "gradwatch_factor": "0.5", "gradwatch_min_lr": "1e-05",
    }
    assert spec_from_labels({"alertname": "R", "run": "r1", **labels}) == LowerLR(factor=0.5, min_lr=1e-5)


def test_action_labels_leave_out_unset_parameters():
    assert action_labels(LowerLR()) == {"gradwatch_action": "lower_lr", "gradwatch_factor": "0.5"}
    assert action_labels(EnableClipping()) == {
        "gradwatch_action": "enable_clipping", "gradwatch_mode": "global_norm", "gradwatch_threshold": "auto",
        "gradwatch_z": "2.5",
    }


def test_what_on_fire_loses_in_prometheus_is_reported():
    r = rule(
        "threshold", metric="m", op="above", value=1,
        on_fire=[{"action": "enable_clipping", "after": "10s"}, {"action": "lower_lr", "repeat": "1m"}],
    )
    doc, unsupported = export(r)
    assert doc["groups"][0]["rules"][0]["labels"]["gradwatch_action"] == "enable_clipping"
    reasons = [u.reason for u in unsupported]
    assert [u.rule for u in unsupported] == ["R", "R", "R"]
    assert "not 10s after it fires" in reasons[0]
    assert "first on_fire step (enable_clipping) only; later steps (lower_lr)" in reasons[1]
    assert "not repeated every 1m" in reasons[2]


# --- what is not exported --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, why",
    [
        (r"(?!.*bias).*", "lookaround"),
        (r"(\w+)\.\1", "back-reference"),
        (r"a++", "possessive"),
        (r"(?x) enc \. .*", "flag RE2 lacks"),
        (r".*weight\Z", "\\Z"),
    ],
)
def test_layer_patterns_re2_refuses_are_reported_not_exported(pattern, why):
    doc, unsupported = export(rule("band", name="Bad", layer_pattern=pattern), rule("stall"))
    assert [r["alert"] for r in doc["groups"][0]["rules"]] == ["R"]
    assert len(unsupported) == 1 and unsupported[0].rule == "Bad"
    assert unsupported[0].reason.startswith("not exported: layer_pattern") and why in unsupported[0].reason


@pytest.mark.parametrize("pattern", [r".*weight", r"encoder\.layers\.\d+\..*", r"\(?=literal", r"[*+]x", r"(?i)FC\d"])
def test_re2_compatible_patterns_are_exported(pattern):
    assert export_rule(rule("band", layer_pattern=pattern))


def test_user_labels_that_would_read_as_action_parameters_are_refused():
    r = rule("stall", labels={"gradwatch_team": "ml"}, on_fire=[{"action": "checkpoint"}])
    with pytest.raises(NotExportable, match="gradwatch_team"):
        export_rule(r)
    # without on_fire nothing reads them: exported as they are
    assert export_rule(rule("stall", labels={"gradwatch_team": "ml"}))["labels"] == {"gradwatch_team": "ml"}


# --- the command ------------------------------------------------------------------------------------


def run(capsys, file=None, output=None, **kw) -> tuple[int, str, str]:
    code = export_command(argparse.Namespace(file=file, output=output, format="prometheus", **kw))
    out, err = capsys.readouterr()
    return code, out, err


def test_command_exports_the_default_pack_to_stdout(capsys):
    code, out, err = run(capsys)
    assert code == 0 and all("on_fire" in line for line in err.splitlines())
    assert out == export_rules(load_rules())[0]


def test_command_writes_out_and_names_what_it_left_out_on_stderr(capsys, tmp_path):
    src, dst = tmp_path / "rules.yaml", tmp_path / "out.yml"
    src.write_text(
        "rules:\n"
        "  - {name: Fine, kind: stall}\n"
        "  - {name: Lookahead, kind: band, layer_pattern: '(?!bias).*'}\n"
    )
    code, out, err = run(capsys, str(src), str(dst), group="g", interval="5s")
    assert (code, out) == (0, "")
    assert err.startswith("gradwatch: rule Lookahead: not exported: layer_pattern '(?!bias).*' uses a lookaround")
    doc = yaml.safe_load(dst.read_text())
    assert [(g["name"], g["interval"], [r["alert"] for r in g["rules"]]) for g in doc["groups"]] == [("g", "5s", ["Fine"])]


def test_command_reads_the_rules_of_a_config_file_without_needing_notifier_secrets(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("GRADWATCH_TEST_SLACK_URL", raising=False)
    src = tmp_path / "gradwatch.yaml"
    src.write_text(
        "rules:\n  - {name: Stalled, kind: stall}\nnotifiers:\n  - {type: slack, url_env: GRADWATCH_TEST_SLACK_URL}\n"
    )
    code, out, _ = run(capsys, str(src))
    assert code == 0 and [r["alert"] for r in yaml.safe_load(out)["groups"][0]["rules"]] == ["Stalled"]
    src.write_text("notifiers: []\n")  # no rules: the default pack, as `serve` would run
    code, out, _ = run(capsys, str(src))
    assert code == 0 and out == export_rules(load_rules())[0]


def test_command_reports_a_bad_file_like_rules_check_and_writes_nothing(capsys, tmp_path):
    src, dst = tmp_path / "rules.yaml", tmp_path / "out.yml"
    src.write_text("rules:\n  - name: LossHigh\n    kind: threshold\n    metric: gradwatch_loss\n    op: over\n    value: 10\n")
    code, out, _ = run(capsys, str(src), str(dst))
    assert code == 1
    assert out == f"{src}:5: rules[0].op: Input should be 'above' or 'below' (got 'over')\n"
    assert not dst.exists()
    code, out, _ = run(capsys, str(tmp_path / "missing.yaml"))
    assert code == 1 and out.startswith(f"{tmp_path / 'missing.yaml'}: <file>: cannot read")


def test_command_refuses_a_bad_interval(capsys):
    code, out, err = run(capsys, interval="2")
    assert (code, out) == (1, "")
    assert err.startswith("gradwatch: --interval: invalid duration '2'")
