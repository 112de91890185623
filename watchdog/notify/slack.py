"""Slack incoming-webhook notifier: one readable message per batch.

Each alert becomes a line a person on call can act on without opening anything:
severity emoji, FIRING/RESOLVED, the alert name, run, rank, layer, value and the
summary annotation. Slack answers 200 "ok", or 4xx with a reason such as
``invalid_payload`` / ``no_service`` (a revoked webhook) and 429 when rate-limited.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import httpx

from gradwatch.watchdog.notify.base import ConfiguredNotifier
from gradwatch.watchdog.alert import Alert
from gradwatch.watchdog.notify.alertmanager import USER_AGENT, alert_status, generator_url, label_dict
from gradwatch.watchdog.notify.config import SlackConfig

MAX_LINES = 20  # beyond this a message is unreadable; the rest are counted, not listed
SEVERITY_EMOJI = {"critical": ":rotating_light:", "error": ":red_circle:", "warning": ":warning:", "info": ":information_source:"}
RESOLVED_EMOJI = ":white_check_mark:"


def _escape(text: str) -> str:
    # Slack's mrkdwn gives &, < and > control meaning (links, mentions).
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return f"{value:.4g}"


def format_line(alert: Alert, external_url: str = "") -> str:
    """One alert as a mrkdwn line (plus its summary on a quoted line)."""
    labels = label_dict(alert)
    status = alert_status(alert)
    severity = labels.get("severity", "")
    emoji = RESOLVED_EMOJI if status == "resolved" else SEVERITY_EMOJI.get(severity, ":fire:")
    head = f"{emoji} *[{status.upper()}] {_escape(labels['alertname'])}*"
    if severity and status == "firing":
        head += f" ({_escape(severity)})"
    where = [f"{key} `{_escape(labels[key])}`" for key in ("run", "rank", "layer") if key in labels]
    if status == "firing":  # NaN shown too: for a non-finite rule it is the news
        where.append(f"value `{format_value(alert.value)}`")
    line = head + (" — " + ", ".join(where) if where else "")
    url = generator_url(external_url, alert)
    if url:
        line += f" <{url}|details>"
    summary = alert.annotations.get("summary") or alert.annotations.get("description")
    if summary:
        line += "\n> " + _escape(summary)
    return line


class SlackNotifier(ConfiguredNotifier):
    """Posts alerts to one Slack incoming webhook. Called on the dispatcher's thread; raises on failure."""

    def __init__(self, config: SlackConfig, *, external_url: str = "", client: httpx.Client | None = None) -> None:
        if config.url is None:  # the config refuses this already; guard hand-built configs too
            raise ValueError(f"slack notifier {config.name!r} has no url")
        self.config = config
        self.external_url = external_url
        self._url = config.url.get_secret_value()
        self._client = client or httpx.Client(timeout=config.timeout, headers={"User-Agent": USER_AGENT})

    def build_payload(self, alerts: Sequence[Alert], now: float) -> dict[str, Any]:
        """The incoming-webhook JSON: ``text`` in mrkdwn, plus channel/username overrides if set."""
        firing = sum(1 for a in alerts if alert_status(a) == "firing")
        resolved = len(alerts) - firing
        counts = []
        if firing:
            counts.append(f":fire: *{firing} firing*")
        if resolved:
            counts.append(f"{RESOLVED_EMOJI} *{resolved} resolved*")
        lines = [" ".join(counts) + " — gradwatch"]
        # Firing first: that is what the reader must act on.
        ordered = sorted(alerts, key=lambda a: alert_status(a) != "firing")
        lines += [format_line(a, self.external_url) for a in ordered[:MAX_LINES]]
        if len(ordered) > MAX_LINES:
            lines.append(f"…and {len(ordered) - MAX_LINES} more")
        payload: dict[str, Any] = {"text": "\n".join(lines)}
        if self.config.channel:
            payload["channel"] = self.config.channel
        if self.config.username:
            payload["username"] = self.config.username
        return payload

    def send(self, alerts: Sequence[Alert], now: float) -> None:
        """One POST; raises httpx.HTTPError on a network error or non-2xx answer."""
        body = json.dumps(self.build_payload(alerts, now)).encode()
        response = self._client.post(self._url, content=body, headers={"Content-Type": "application/json"})
        response.raise_for_status()

