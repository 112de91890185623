"""Notifier configs and the exact requests each notifier sends, read back by a local receiver."""

from __future__ import annotations

import base64
import hashlib
import hmac
import subprocess
import sys
from datetime import datetime

import httpx
import pytest
import yaml
from pydantic import ValidationError

from gradwatch.watchdog.alert import Alert, AlertState
from gradwatch.watchdog.notify.config import build_notifier, parse_notifiers
from tests.integration.servers import free_port

NOW = 1_700_000_000.0


def firing(run="r1", layer="fc1.weight", value=960.0, severity="critical") -> Alert:
    return Alert(
        rule="GradientExplosion",
        labels=(("alertname", "GradientExplosion"), ("layer", layer), ("rank", "0"), ("run", run), ("severity", severity)),
        annotations={"summary": f"gradient norm of {layer} is {value}"},
        state=AlertState.FIRING,
        value=value,
        active_at=NOW - 60,
        fired_at=NOW - 30,
    )


def resolved(alert: Alert, at: float = NOW) -> Alert:
    alert.state, alert.resolved_at = AlertState.INACTIVE, at
    return alert


def notifier(**config):
    [cfg] = parse_notifiers([config])
    return build_notifier(cfg, external_url="http://watchdog.test:8000")


def epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# -- config ---------------------------------------------------------------------------

EXAMPLE = """
notifiers:
  - type: alertmanager
    url: http://127.0.0.1:9093
    bearer_token_env: AM_TOKEN
  - type: webhook
    name: ops-hook
    url: https://hooks.example.org/gradwatch
    secret_env: HOOK_SECRET
    headers: {X-Team: ml-infra}
    repeat_interval: 1h30m
  - type: slack
    url_env: SLACK_URL
    channel: "#training-alerts"
    send_resolved: false
"""


def test_example_config_parses_with_secrets_from_environment(monkeypatch):
    monkeypatch.setenv("AM_TOKEN", "tok")
    monkeypatch.setenv("HOOK_SECRET", "s3cret")
    monkeypatch.setenv("SLACK_URL", "https://hooks.slack.com/services/T/B/X")
    am, hook, slack = parse_notifiers(yaml.safe_load(EXAMPLE)["notifiers"])
    assert (am.name, am.repeat_interval, am.send_resolved) == ("alertmanager", 60.0, True)
    assert am.bearer_token.get_secret_value() == "tok"
    assert (hook.name, hook.repeat_interval, hook.secret.get_secret_value()) == ("ops-hook", 5400.0, "s3cret")
    assert (slack.name, slack.repeat_interval, slack.send_resolved) == ("slack", 4 * 3600.0, False)
    assert slack.url.get_secret_value() == "https://hooks.slack.com/services/T/B/X"
    assert "hooks.slack.com" not in repr(slack)  # the webhook URL is a secret: never in logs


def test_slack_without_url_is_refused_with_what_to_set():
    with pytest.raises(ValidationError) as info:
        parse_notifiers([{"type": "slack", "name": "oncall"}])
    message = str(info.value)
    assert "slack notifier 'oncall' has no url" in message
    assert "url_env" in message


def test_secret_from_unset_environment_variable_is_refused(monkeypatch):
    monkeypatch.delenv("SLACK_URL", raising=False)
    with pytest.raises(ValidationError, match="environment variable 'SLACK_URL' is not set"):
        parse_notifiers([{"type": "slack", "url_env": "SLACK_URL"}])


@pytest.mark.parametrize(
    "configs, match",
    [
        ([{"type": "alertmanager", "url": "http://am:9093", "repeat_interval": "1h"}], "at most 5m"),
        ([{"type": "webhook", "url": "http://h", "timeout": "soon"}], "is not a duration"),
        ([{"type": "webhook", "url": "http://a"}, {"type": "webhook", "url": "http://b"}], "two notifiers are named 'webhook'"),
        ([{"type": "webhook", "url": "http://h", "sign": "x"}], "Extra inputs are not permitted"),
        ([{"type": "pagerduty"}], "does not match any of the expected tags"),
        ([{"type": "webhook", "url": "http://h", "secret": "a", "secret_env": "B"}], "not both"),
    ],
)
def test_bad_notifier_configs_are_refused(configs, match):
    with pytest.raises(ValidationError, match=match):
        parse_notifiers(configs)


# -- Alertmanager -----------------------------------------------------------------------


def test_alertmanager_posts_v2_alerts_valid_a_few_repeat_intervals(receiver):
    n = notifier(type="alertmanager", url=receiver.url, bearer_token="tok")
    alert = firing()
    n.send([alert], NOW)
    [req] = receiver.wait_for(1)
    assert req.path == "/api/v2/alerts"
    assert req.headers["Authorization"] == "Bearer tok"
    assert req.headers["Content-Type"] == "application/json"
    [item] = req.json()
    assert item["labels"] == dict(alert.labels)
    assert item["annotations"] == alert.annotations
    assert epoch(item["startsAt"]) == pytest.approx(alert.fired_at)
    # Alertmanager drops an alert whose endsAt passed: it must outlive several re-posts.
    assert epoch(item["endsAt"]) == pytest.approx(NOW + 4 * 60)
    assert item["generatorURL"] == f"http://watchdog.test:8000/alerts/{alert.fingerprint}"
    n.close()


def test_alertmanager_resolution_carries_endsat(receiver):
    n = notifier(type="alertmanager", url=receiver.url, basic_auth={"username": "u", "password": "p"})
    n.send([resolved(firing(), at=NOW - 5)], NOW)
    [req] = receiver.wait_for(1)
    [item] = req.json()
    assert epoch(item["endsAt"]) == pytest.approx(NOW - 5)
    assert req.headers["Authorization"] == "Basic " + base64.b64encode(b"u:p").decode()
    n.close()


# -- webhook ----------------------------------------------------------------------------


def test_webhook_sends_alertmanager_v4_document_signed_over_raw_body(receiver):
    n = notifier(type="webhook", name="ops", url=receiver.url + "/hook", secret="s3cret", headers={"X-Team": "ml"})
    a, b = firing(layer="fc1.weight"), resolved(firing(layer="fc2.weight"))
    n.send([a, b], NOW)
    [req] = receiver.wait_for(1)
    expected = "sha256=" + hmac.new(b"s3cret", req.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(req.headers["X-Gradwatch-Signature"], expected)
    assert req.headers["X-Team"] == "ml"
    doc = req.json()
    assert doc["version"] == "4"
    assert doc["receiver"] == "ops"
    assert doc["status"] == "firing"  # any alert firing makes the group firing
    assert doc["commonLabels"] == {"alertname": "GradientExplosion", "rank": "0", "run": "r1", "severity": "critical"}
    assert doc["truncatedAlerts"] == 0
    first, second = doc["alerts"]
    assert (first["status"], first["endsAt"]) == ("firing", "0001-01-01T00:00:00Z")
    assert (second["status"], epoch(second["endsAt"])) == ("resolved", NOW)
    assert first["fingerprint"] == a.fingerprint and first["labels"]["layer"] == "fc1.weight"


def test_webhook_without_secret_is_unsigned_and_all_resolved_is_resolved(receiver):
    n = notifier(type="webhook", url=receiver.url)
    n.send([resolved(firing())], NOW)
    [req] = receiver.wait_for(1)
    assert "X-Gradwatch-Signature" not in req.headers
    assert req.json()["status"] == "resolved"


def test_http_error_and_unreachable_endpoint_raise(receiver):
    receiver.fail_next(1, status=503)
    with pytest.raises(httpx.HTTPStatusError):
        notifier(type="webhook", url=receiver.url).send([firing()], NOW)
    with pytest.raises(httpx.TransportError):
        notifier(type="webhook", url=f"http://127.0.0.1:{free_port()}", timeout=2).send([firing()], NOW)


# -- Slack ------------------------------------------------------------------------------


def test_slack_message_names_run_rank_layer_value_and_summary(receiver):
    n = notifier(type="slack", url=receiver.url + "/services/T/B/X", channel="#train", username="gradwatch")
    n.send([firing(value=float("nan"), severity="warning"), resolved(firing(layer="fc2.weight"))], NOW)
    [req] = receiver.wait_for(1)
    assert req.path == "/services/T/B/X"
    msg = req.json()
    assert (msg["channel"], msg["username"]) == ("#train", "gradwatch")
    header, fire, summary, solved, _ = msg["text"].split("\n")
    assert "1 firing" in header and "1 resolved" in header
    assert fire.startswith(":warning: *[FIRING] GradientExplosion* (warning)")
    for part in ("run `r1`", "rank `0`", "layer `fc1.weight`", "value `NaN`", "<http://watchdog.test:8000/alerts/"):
        assert part in fire
    assert summary == "> gradient norm of fc1.weight is nan"
    assert solved.startswith(":white_check_mark: *[RESOLVED] GradientExplosion*") and "fc2.weight" in solved
    assert "value" not in solved  # a resolved alert's last value would mislead


def test_slack_escapes_control_characters(receiver):
    alert = firing()
    alert.annotations["summary"] = "norm <b> & <!channel>"
    notifier(type="slack", url=receiver.url).send([alert], NOW)
    [req] = receiver.wait_for(1)
    assert "norm &lt;b&gt; &amp; &lt;!channel&gt;" in req.json()["text"]


def test_notify_package_never_imports_torch():
    code = (
        "import sys\n"
        "import gradwatch.watchdog.notify.dispatcher, gradwatch.watchdog.notify.slack, gradwatch.watchdog.notify.webhook\n"
        "import gradwatch.watchdog.store\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
