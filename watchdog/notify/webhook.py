"""Generic webhook notifier: Alertmanager's webhook payload (version 4), optionally signed.

The document has exactly the fields Alertmanager's own webhook sends, so one
receiver serves alerts from the watchdog and from Alertmanager alike. With a
``secret``, the header ``X-Gradwatch-Signature: sha256=<hex>`` carries the
HMAC-SHA256 of the raw request body; a receiver recomputes it over the bytes it
read (before parsing) and compares in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Any

import httpx

from gradwatch.watchdog.notify.base import ConfiguredNotifier
from gradwatch.watchdog.alert import Alert
from gradwatch.watchdog.notify.alertmanager import (
    USER_AGENT,
    alert_status,
    generator_url,
    label_dict,
    rfc3339,
    started_at,
)
from gradwatch.watchdog.notify.config import WebhookConfig

SIGNATURE_HEADER = "X-Gradwatch-Signature"
ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt for an alert still firing


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value for ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _common(dicts: list[dict[str, str]]) -> dict[str, str]:
    if not dicts:
        return {}
    first, *rest = dicts
    return {k: v for k, v in first.items() if all(d.get(k) == v for d in rest)}


class WebhookNotifier(ConfiguredNotifier):
    """POSTs one v4 document per batch to a URL. Called on the dispatcher's thread; raises on failure."""

    def __init__(self, config: WebhookConfig, *, external_url: str = "", client: httpx.Client | None = None) -> None:
        self.config = config
        self.external_url = external_url
        self._secret = config.secret.get_secret_value().encode() if config.secret is not None else None
        headers = {"User-Agent": USER_AGENT, **config.headers}
        self._client = client or httpx.Client(timeout=config.timeout, headers=headers)

    def build_payload(self, alerts: Sequence[Alert], now: float) -> dict[str, Any]:
        """The v4 document; ``now`` is unused (firing alerts carry Alertmanager's zero endsAt)."""
        items = []
        for alert in alerts:
            status = alert_status(alert)
            items.append(
                {
                    "status": status,
                    "labels": label_dict(alert),
                    "annotations": dict(alert.annotations),
                    "startsAt": rfc3339(started_at(alert)),
                    "endsAt": ZERO_TIME if status == "firing" else rfc3339(alert.resolved_at),  # type: ignore[arg-type]
                    "generatorURL": generator_url(self.external_url, alert),
                    "fingerprint": alert.fingerprint,
                }
            )
        common_labels = _common([i["labels"] for i in items])
        group = ", ".join(f'{k}="{v}"' for k, v in sorted(common_labels.items()))
        return {
            "version": "4",
            "groupKey": f"{{}}/gradwatch/{self.name}:{{{group}}}",
            "truncatedAlerts": 0,
            "status": "firing" if any(i["status"] == "firing" for i in items) else "resolved",
            "receiver": self.name,
            "groupLabels": {},  # the watchdog does not group; Alertmanager does
            "commonLabels": common_labels,
            "commonAnnotations": _common([i["annotations"] for i in items]),
            "externalURL": self.external_url,
            "alerts": items,
        }

    def send(self, alerts: Sequence[Alert], now: float) -> None:
        """One signed POST; raises httpx.HTTPError on a network error or non-2xx answer."""
        body = json.dumps(self.build_payload(alerts, now), separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, body)
        response = self._client.post(str(self.config.url), content=body, headers=headers)
        response.raise_for_status()

