"""The alert record shared by the state machine, the notifiers and the store."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field

from gradwatch.watchdog.samples import Labels


class AlertState(enum.StrEnum):
    INACTIVE = "inactive"
    PENDING = "pending"
    FIRING = "firing"


@dataclass
class Alert:
    """One alert instance: a rule and the label set it fired for (rule labels merged in).

    Times are seconds since the epoch from the engine's clock. ``resolved_at`` is set
    when a firing alert stops firing; such an alert is kept (state INACTIVE) long enough
    for its resolution to be sent, then dropped.
    """

    rule: str
    labels: Labels
    annotations: dict[str, str] = field(default_factory=dict)
    state: AlertState = AlertState.PENDING
    value: float = float("nan")
    active_at: float = 0.0
    fired_at: float | None = None
    resolved_at: float | None = None
    last_sent_at: float | None = None
    keep_firing_since: float | None = None

    @property
    def fingerprint(self) -> str:
        """Stable id of the label set (same labels, same fingerprint, across restarts)."""
        text = "\x00".join(f"{k}\x01{v}" for k, v in self.labels)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def label(self, key: str, default: str = "") -> str:
        return dict(self.labels).get(key, default)
