"""The Alertmanager notifier against the real Alertmanager: what we post is what a receiver gets."""

from __future__ import annotations

import time

import pytest

from gradwatch.watchdog.alert import Alert, AlertState
from gradwatch.watchdog.notify.alertmanager import AlertmanagerNotifier
from gradwatch.watchdog.notify.config import AlertmanagerConfig, WebhookConfig
from gradwatch.watchdog.notify.webhook import WebhookNotifier
from tests.integration.servers import start_alertmanager

pytestmark = pytest.mark.integration

CONFIG = """
route:
  receiver: hook
  group_by: [alertname, run]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs:
      - url: {url}/hook
        send_resolved: true
"""


@pytest.fixture
def alertmanager(tmp_path, receiver):
    server = start_alertmanager(CONFIG.format(url=receiver.url), tmp_path)
    yield server
    server.stop()


def _alert(now: float) -> Alert:
    return Alert(
        rule="GradientExplosion",
        labels=(("alertname", "GradientExplosion"), ("layer", "fc1.weight"), ("rank", "0"), ("run", "itest"), ("severity", "critical")),
        annotations={"summary": "gradient norm 960 > 100"},
        state=AlertState.FIRING,
        value=960.0,
        active_at=now - 30,
        fired_at=now - 1,
    )


def _notifications(receiver, status: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for request in receiver.successful():
            if request.path == "/hook" and request.json()["status"] == status:
                return request.json()
        time.sleep(0.05)
    raise AssertionError(f"no {status} notification from Alertmanager within {timeout}s; got {[r.json() for r in receiver.requests]}")


def test_firing_then_resolved_reaches_alertmanager_receiver(alertmanager, receiver):
    notifier = AlertmanagerNotifier(AlertmanagerConfig(type="alertmanager", url=alertmanager.url), external_url="http://127.0.0.1:9/")
    now = time.time()
    alert = _alert(now)
    try:
        notifier.send([alert], now)
        firing = _notifications(receiver, "firing", timeout=10)
        assert firing["version"] == "4"
        [got] = firing["alerts"]
        assert got["status"] == "firing"
        assert got["labels"] == dict(alert.labels)
        assert got["annotations"] == alert.annotations
        assert got["generatorURL"] == f"http://127.0.0.1:9/alerts/{alert.fingerprint}"

        # Our own webhook document has exactly Alertmanager's fields, so one receiver parses both.
        ours = WebhookNotifier(WebhookConfig(type="webhook", url="http://127.0.0.1:9/")).build_payload([alert], now)
        assert set(ours) == set(firing)
        assert set(ours["alerts"][0]) == set(got)
        assert ours["alerts"][0]["endsAt"] == got["endsAt"]  # the zero time for a firing alert

        alert.state, alert.resolved_at = AlertState.INACTIVE, time.time()
        notifier.send([alert], alert.resolved_at)
        resolved = _notifications(receiver, "resolved", timeout=10)
        assert resolved["alerts"][0]["labels"] == dict(alert.labels)
        assert resolved["alerts"][0]["status"] == "resolved"
    finally:
        notifier.close()
