"""What the HTTP API answers, as pydantic models: the shapes its OpenAPI document shows.

Times are seconds since the epoch (floats), as everywhere in the watchdog. Alert
values are strings, as in Prometheus's API, because NaN and ±Inf — the values a
sick run produces — are not JSON numbers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from gradwatch.watchdog.alert import Alert
from gradwatch.watchdog.engine import RuleHealth
from gradwatch.watchdog.rules.loader import Problem
from gradwatch.watchdog.service import Health, RunStatus, alert_status, format_value
from gradwatch.watchdog.store import AuditEntry

AlertStatus = Literal["pending", "firing", "resolved"]


class RunOut(BaseModel):
    run: str
    rank: int
    world_size: int
    metrics_url: str
    registered_at: float
    last_seen: float = Field(description="Last successful scrape (or the registration).")
    stale: bool = Field(description="Not answering for stale_after seconds; kept until registration_expiry, then removed.")
    last_step: int | None
    pid: int | None
    hostname: str | None
    last_error: str | None = Field(description="Why the last scrape failed, if it did.")

    @classmethod
    def of(cls, status: RunStatus) -> RunOut:
        return cls(**vars(status.record), last_error=status.last_error)


class RegisteredOut(BaseModel):
    run: RunOut
    scrape_interval_s: float = Field(description="How often the watchdog scrapes (agents may align their export to it).")


class AlertOut(BaseModel):
    rule: str
    fingerprint: str = Field(description="Stable id of the label set, across restarts.")
    state: AlertStatus
    labels: dict[str, str]
    annotations: dict[str, str]
    value: str = Field(description="The value that matched, as text: NaN and ±Inf included.")
    active_at: float
    fired_at: float | None
    resolved_at: float | None
    last_sent_at: float | None

    @classmethod
    def of(cls, a: Alert) -> AlertOut:
        return cls(
            rule=a.rule, fingerprint=a.fingerprint, state=alert_status(a), labels=dict(a.labels),
            annotations=a.annotations, value=format_value(a.value), active_at=a.active_at,
            fired_at=a.fired_at, resolved_at=a.resolved_at, last_sent_at=a.last_sent_at,
        )


class AuditOut(BaseModel):
    id: int = Field(description="Increases with every entry: append order.")
    time: float
    kind: str = Field(description="area.event, e.g. alert.firing, notify.sent, run.registered, config.reloaded.")
    run: str | None
    rule: str | None
    fingerprint: str | None
    details: dict[str, Any]

    @classmethod
    def of(cls, e: AuditEntry) -> AuditOut:
        return cls(**vars(e))


class ProblemOut(BaseModel):
    location: str = Field(description="YAML path, e.g. rules[2].for or notifiers[0].url.")
    line: int | None
    reason: str

    @classmethod
    def of(cls, p: Problem) -> ProblemOut:
        return cls(location=p.location, line=p.line, reason=p.reason)


class ReloadOut(BaseModel):
    ok: bool
    source: str = Field(description="The file read (or the built-in defaults).")
    rules: int = Field(description="Rules in force after the call.")
    problems: list[ProblemOut] = Field(default_factory=list)


class RuleHealthOut(BaseModel):
    state: Literal["unknown", "ok", "err"]
    last_error: str | None
    errors_total: int
    last_duration_s: float
    last_eval_at: float | None

    @classmethod
    def of(cls, h: RuleHealth) -> RuleHealthOut:
        return cls(**vars(h))


class StoreHealthOut(BaseModel):
    writable: bool = Field(description="False while writes to the store fail (e.g. a full disk).")
    error: str | None
    since: float | None = Field(description="When writes started failing.")


class HealthOut(BaseModel):
    status: Literal["ok", "starting", "stalled", "unhealthy"] = Field(
        description="unhealthy: the store cannot be written (what is decided now is lost on restart)."
    )
    source: Literal["scrape", "prometheus"]
    last_round_at: float | None
    last_round_duration_s: float | None
    runs: int
    series: int
    rules: dict[str, RuleHealthOut]
    notifiers: dict[str, dict[str, Any]] = Field(description="Per notifier: sent/failed/dropped counts, queue, last error.")
    store: StoreHealthOut

    @classmethod
    def of(cls, h: Health) -> HealthOut:
        rules = {n: RuleHealthOut.of(r) for n, r in h.rules.items()}
        return cls(**{**vars(h), "rules": rules, "store": StoreHealthOut(**vars(h.store))})
