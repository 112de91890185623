"""What every notifier shares: its identity and delivery settings read from its config, and its HTTP client."""

from __future__ import annotations

import httpx


class ConfiguredNotifier:
    """Base of the notifiers: ``config`` (name, send_resolved, repeat_interval) and ``_client``."""

    config: object
    _client: httpx.Client

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def send_resolved(self) -> bool:
        return self.config.send_resolved

    @property
    def repeat_interval_s(self) -> float:
        return self.config.repeat_interval

    def close(self) -> None:
        self._client.close()
