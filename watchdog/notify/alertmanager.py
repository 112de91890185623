"""Alertmanager API v2 notifier, and the Alertmanager data model the other notifiers share.

One ``send`` is one ``POST <url>/api/v2/alerts`` with a JSON array of
``{labels, annotations, startsAt, endsAt, generatorURL}``. Alertmanager forgets an
alert whose ``endsAt`` has passed, so a firing alert carries an ``endsAt`` a few
re-post periods ahead (as Prometheus does) and the dispatcher re-posts it every
``repeat_interval``; a resolved alert carries the time it resolved.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from gradwatch.watchdog.notify.base import ConfiguredNotifier
from gradwatch.watchdog.alert import Alert, AlertState
from gradwatch.watchdog.notify.config import ALERTMANAGER_VALIDITY_FACTOR, AlertmanagerConfig

USER_AGENT = "gradwatch-watchdog"


def rfc3339(t: float) -> str:
    """Seconds since the epoch → ``2024-05-01T12:00:00.123Z`` (what Alertmanager parses)."""
    return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert_status(alert: Alert) -> str:
    """``firing`` or ``resolved``; a pending alert is never notified, so passing one is a bug upstream."""
    if alert.state == AlertState.FIRING:
        return "firing"
    if alert.resolved_at is not None:
        return "resolved"
    raise ValueError(f"alert {alert.rule} {alert.fingerprint} is {alert.state}, not firing or resolved: it must not be notified")


def started_at(alert: Alert) -> float:
    """When the current firing episode began (Prometheus sends FiredAt as startsAt)."""
    return alert.fired_at if alert.fired_at is not None else alert.active_at


def label_dict(alert: Alert) -> dict[str, str]:
    labels = dict(alert.labels)
    labels.setdefault("alertname", alert.rule)
    return labels


def generator_url(external_url: str, alert: Alert) -> str:
    """Link back to the alert in the watchdog's API; empty when the watchdog's URL is unknown."""
    return f"{external_url.rstrip('/')}/alerts/{alert.fingerprint}" if external_url else ""


class AlertmanagerNotifier(ConfiguredNotifier):
    """Posts alerts to one Alertmanager. Called on the dispatcher's thread; raises on failure."""

    def __init__(self, config: AlertmanagerConfig, *, external_url: str = "", client: httpx.Client | None = None) -> None:
        self.config = config
        self.external_url = external_url
        self.endpoint = str(config.url).rstrip("/") + "/api/v2/alerts"
        headers = {"User-Agent": USER_AGENT}
        if config.bearer_token is not None:
            headers["Authorization"] = f"Bearer {config.bearer_token.get_secret_value()}"
        auth = None
        if config.basic_auth is not None:
            auth = httpx.BasicAuth(config.basic_auth.username, config.basic_auth.password.get_secret_value())
        self._client = client or httpx.Client(timeout=config.timeout, headers=headers, auth=auth)

    def build_payload(self, alerts: Sequence[Alert], now: float) -> list[dict[str, Any]]:
        """The JSON array for ``POST /api/v2/alerts``; ``now`` dates the validity of firing alerts."""
        valid_until = now + ALERTMANAGER_VALIDITY_FACTOR * self.config.repeat_interval
        payload = []
        for alert in alerts:
            item: dict[str, Any] = {
                "labels": label_dict(alert),
                "annotations": dict(alert.annotations),
                "startsAt": rfc3339(started_at(alert)),
                "endsAt": rfc3339(valid_until if alert_status(alert) == "firing" else alert.resolved_at),  # type: ignore[arg-type]
            }
            url = generator_url(self.external_url, alert)
            if url:  # Alertmanager validates it as a URI: omit rather than send ""
                item["generatorURL"] = url
            payload.append(item)
        return payload

    def send(self, alerts: Sequence[Alert], now: float) -> None:
        """One POST with every alert; raises httpx.HTTPError on a network error or non-2xx answer."""
        body = json.dumps(self.build_payload(alerts, now)).encode()
        response = self._client.post(self.endpoint, content=body, headers={"Content-Type": "application/json"})
        response.raise_for_status()

