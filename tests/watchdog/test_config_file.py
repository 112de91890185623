"""The watchdog's config file: rules + notifiers, every problem located, checked at start-up."""

import pytest

from gradwatch.watchdog.config_file import ConfigError, WatchdogConfig, load_config, parse_config
from gradwatch.watchdog.rules.loader import RulesError, load_rules

WEBHOOK = "notifiers:\n  - type: webhook\n    url: http://127.0.0.1:9/hook\n"
ONE_RULE = "rules:\n  - name: LossHigh\n    kind: threshold\n    metric: gradwatch_loss\n    op: above\n    value: 10\n"


def problems(text: str) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return [(p.location, p.line, p.reason) for p in info.value.problems]


def test_no_file_means_the_default_pack_and_no_notifiers():
    config = load_config(None)
    assert [r.name for r in config.rules] == [r.name for r in load_rules(None).rules]
    assert config.notifiers == []


def test_a_file_without_rules_gets_the_default_pack():
    config = parse_config(WEBHOOK)
    assert len(config.rules) == len(load_rules(None).rules)
    assert [n.name for n in config.notifiers] == ["webhook"]


def test_rules_and_notifiers_together(tmp_path):
    path = tmp_path / "gradwatch.yaml"
    path.write_text(ONE_RULE + WEBHOOK)
    config = load_config(path)
    assert [r.name for r in config.rules] == ["LossHigh"]
    assert str(config.notifiers[0].url) == "http://127.0.0.1:9/hook"


def test_a_rules_only_file_is_a_config_file():
    assert isinstance(parse_config(ONE_RULE), WatchdogConfig)


def test_a_slack_notifier_without_url_is_a_start_up_error():
    ((location, line, reason),) = problems("notifiers:\n  - type: slack\n    channel: '#ml'\n")
    assert (location, line) == ("notifiers[0]", 2)
    assert "has no url" in reason and "url_env" in reason


def test_a_url_env_naming_an_unset_variable_is_refused(monkeypatch):
    monkeypatch.delenv("GRADWATCH_TEST_UNSET", raising=False)
    ((location, _, reason),) = problems("notifiers:\n  - type: slack\n    url_env: GRADWATCH_TEST_UNSET\n")
    assert location == "notifiers[0]" and "GRADWATCH_TEST_UNSET" in reason


def test_url_env_is_read_at_load_time(monkeypatch):
    monkeypatch.setenv("GRADWATCH_TEST_SLACK", "https://hooks.slack.com/services/T/B/x")
    config = parse_config("notifiers:\n  - type: slack\n    url_env: GRADWATCH_TEST_SLACK\n")
    assert config.notifiers[0].url.get_secret_value().startswith("https://hooks.slack.com/")


def test_unknown_top_level_keys_are_refused_naming_the_allowed_ones():
    ((location, line, reason),) = problems(ONE_RULE + "policies: {}\n")
    assert (location, line) == ("policies", 7)
    assert reason == "unknown key 'policies' (allowed: rules, notifiers)"


def test_unknown_notifier_type_and_key_are_located():
    text = "notifiers:\n  - type: pager\n  - type: webhook\n    url: http://x\n    secrett: s\n"
    assert problems(text) == [
        ("notifiers[0].type", 2, "unknown type 'pager': expected one of alertmanager, webhook, slack"),
        ("notifiers[1].secrett", 5, "unknown key 'secrett' (did you mean 'secret'? allowed: "
         "name, send_resolved, repeat_interval, timeout, type, url, secret, headers)"),
    ]


def test_rule_and_notifier_problems_are_reported_together_in_line_order():
    text = (
        "rules:\n  - name: A\n    kind: stall\n    for: soon\n"
        "notifiers:\n  - type: webhook\n    url: not a url\n"
    )
    found = problems(text)
    assert [(loc, line) for loc, line, _ in found] == [("rules[0].for", 4), ("notifiers[0].url", 7)]


def test_duplicate_rule_names_are_refused():
    text = ONE_RULE + ONE_RULE.replace("rules:\n", "")
    ((location, line, reason),) = problems(text)
    assert (location, line) == ("rules[1].name", 7) and "duplicate rule name 'LossHigh'" in reason


def test_duplicate_notifier_names_are_refused():
    text = WEBHOOK + "  - type: webhook\n    url: http://127.0.0.1:9/other\n"
    ((location, _, reason),) = problems(text)
    assert location == "notifiers" and "two notifiers are named 'webhook'" in reason


def test_yaml_errors_and_non_mappings_are_problems_too():
    ((location, line, reason),) = problems("rules: [\n")
    assert location == "<yaml>" and line is not None and reason.startswith("not valid YAML")
    ((location, _, reason),) = problems("- just\n- a list\n")
    assert location == "<root>" and "`rules`, `notifiers`" in reason


def test_an_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml")
    assert info.value.problems[0].location == "<file>" and "cannot read" in info.value.problems[0].reason
    assert isinstance(info.value, RulesError)  # one except clause catches rules and config errors
