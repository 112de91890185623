"""The watchdog's dead-man's switch: GradwatchWatchdog is posted to Alertmanager while, and only while, it is healthy."""

from __future__ import annotations

import sqlite3

import pytest

from gradwatch.watchdog.config_file import load_config
from gradwatch.watchdog.service import Service
from gradwatch.watchdog.settings import Settings
from tests.receiver import Receiver
from tests.watchdog.fakes import T0, Clock


def posted_alertnames(receiver: Receiver) -> list[str]:
    return [a["labels"]["alertname"] for r in receiver.successful() for a in r.json()]


def test_gradwatch_watchdog_alert_is_always_firing_to_alertmanager_only(tmp_path):
    with Receiver() as alertmanager, Receiver() as hook:
        path = tmp_path / "gw.yaml"
        path.write_text(
            f"notifiers:\n  - type: alertmanager\n    url: {alertmanager.url}\n    repeat_interval: 1m\n"
            f"  - type: webhook\n    url: {hook.url}/hook\n"
        )
        clock = Clock()
        service = Service(Settings(db=str(tmp_path / "gw.db"), config=path), load_config(path), clock=clock)
        try:
            service.tick(T0)
            [request] = alertmanager.wait_for(1)
            [alert] = request.json()
            assert alert["labels"] == {"alertname": "GradwatchWatchdog", "severity": "none"}
            assert alert["endsAt"] > alert["startsAt"]  # valid a few keep-alives ahead, then resolved by Alertmanager
            clock.t = T0 + 61
            service.tick(T0 + 61)
            alertmanager.wait_for(2)  # re-posted every keep-alive while healthy
            assert posted_alertnames(alertmanager) == ["GradwatchWatchdog"] * 2
            # A store that cannot be written is not healthy: the keep-alive stops, so the switch trips.
            pages = service.store._conn.execute("PRAGMA page_count").fetchone()[0]
            service.store._conn.execute(f"PRAGMA max_page_count = {pages}")
            with pytest.raises(sqlite3.OperationalError, match="full"):
                for i in range(100):
                    service.store.append_audit("x.y", time=T0, details={"pad": "p" * 4000, "i": i})
            assert service.health().status == "unhealthy"
            clock.t = T0 + 200
            service.tick(T0 + 200)
            service.dispatcher.flush()
            assert posted_alertnames(alertmanager) == ["GradwatchWatchdog"] * 2
        finally:
            service.close()
        assert hook.requests == []  # not sent to humans' channels
