"""How the watchdog process runs: where it listens, where it keeps state, how often it looks.

Built once by ``gradwatch serve``: command-line flags win over ``GRADWATCH_*``
environment variables (``GRADWATCH_PORT=9500``, ``GRADWATCH_PROMETHEUS_URL=...``),
which win over the defaults below. The defaults run a complete watchdog on one
machine with no other server. What is watched and who is told lives in the config
file (:mod:`gradwatch.watchdog.config_file`), which ``config`` points at.

Durations are seconds or Prometheus-style strings (``2``, ``500ms``, ``1m``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, HttpUrl, SecretStr, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gradwatch.watchdog.alerting import DEFAULT_RESEND_DELAY_S
from gradwatch.watchdog.commands import CommandLimits
from gradwatch.watchdog.schema import read_secret
from gradwatch.watchdog.durations import PositiveSeconds, Span, SpanField
from gradwatch.watchdog.rules.policy import RemediationMode
from gradwatch.watchdog.sources.scrape import TargetLimits

DEFAULT_PORT = 9400


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRADWATCH_", extra="forbid", frozen=True)

    host: str = Field(
        "127.0.0.1",
        description="Address the HTTP API binds. Loopback by default: agents on other machines need "
        "0.0.0.0 (or the host's address) and a network you trust.",
    )
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="HTTP API port (0: any free port, logged at start).")
    config: Path | None = Field(
        None, description="The YAML config file (rules and notifiers). None: the default rule pack, no notifiers."
    )
    db: str = Field(
        "gradwatch.db",
        description="SQLite file holding runs, alert states, deliveries and the audit log (relative to the "
        "working directory). Keep it across restarts: it is what lets a restarted watchdog keep firing "
        "alerts and not re-notify. ':memory:' keeps nothing.",
    )
    scrape_interval: PositiveSeconds = Field(
        2.0,
        description="Seconds between two rounds of scrape (or Prometheus query) + rule evaluation. 2 s because "
        "an explosion goes from healthy to NaN within a few dozen steps; the default rule pack's `for` "
        "durations assume it.",
    )
    scrape_timeout: PositiveSeconds | None = Field(
        None,
        description="Seconds one round's source may take: the deadline of each agent's whole scrape (connect, "
        "headers and body, counted from the round's start), or of the Prometheus query. None: the scrape interval.",
    )
    stale_after: PositiveSeconds = Field(
        60.0, description="A registered run that has not answered a scrape for this long is marked stale."
    )
    registration_expiry: PositiveSeconds = Field(
        3600.0,
        description="A registration whose agent has not answered a scrape for this long (nor registered again) is "
        "removed, audited as run.expired; its audit history stays. At least stale_after. Direct scraping only.",
    )
    max_registrations: int = Field(
        10_000,
        ge=1,
        description="Most registrations (run, rank) held at once; one more is refused (HTTP 429) until a stale one "
        "expires or a finished run deregisters. Every rank of a job registers.",
    )
    scrape_concurrency: int = Field(
        64, ge=1, le=1024, description="Agents scraped at once (worker threads); agents that answered last time go first."
    )
    target_sample_limit: int = Field(
        50_000,
        ge=1,
        description="Most gradwatch samples one scrape of one agent may hold (Prometheus's sample_limit); over it the "
        "scrape fails with the reason and its samples are dropped. A 400-tensor model exports about 3,500.",
    )
    target_series_limit: int = Field(
        100_000,
        ge=1,
        description="Most series one agent may hold in memory: those it exports plus those it stopped exporting that "
        "are still kept (up to an hour). Labels that change every scrape hit it; that agent's scrapes then fail. "
        "At least target_sample_limit.",
    )
    max_series: int = Field(
        1_000_000,
        ge=1,
        description="Most series the watchdog holds over all agents (about 1 KB each); a scrape that would add "
        "past it fails.",
    )
    prometheus_url: HttpUrl | None = Field(
        None,
        description="Query this Prometheus (or Thanos/Mimir) HTTP API for the agents' series instead of "
        "scraping the agents directly. Include any route prefix.",
    )
    prometheus_bearer_token: SecretStr | None = Field(None, description="Bearer token sent to prometheus_url.")
    prometheus_username: str | None = Field(None, description="Basic-auth user for prometheus_url (with the password).")
    prometheus_password: SecretStr | None = Field(None, description="Basic-auth password for prometheus_url.")
    resend_delay: PositiveSeconds = Field(
        DEFAULT_RESEND_DELAY_S,
        description="Minimum seconds between two hand-overs of a still-firing alert to the notifiers "
        "(Prometheus's --rules.alert.resend-delay); each notifier's repeat_interval then decides what is sent.",
    )
    external_url: str = Field(
        "",
        description="The watchdog's URL as people reach it, for links in notifications. Empty: "
        "http://HOST:PORT as bound.",
    )
    secret: SecretStr | None = Field(
        None,
        description="Shared command secret (GRADWATCH_SECRET), the same the agents read. It signs commands and "
        "authenticates agents, operators and Alertmanager. None (and no secret_file): notify only, no remediation.",
    )
    secret_file: Path | None = Field(None, description="File holding the shared secret (wins over `secret`).")
    max_commands_per_run: int = Field(6, ge=1, description="Rule- and Alertmanager-triggered commands per run per command_window.")
    command_window: PositiveSeconds = Field(600.0, description="The window of max_commands_per_run.")
    command_cooldown: PositiveSeconds = Field(
        15.0, description="Minimum seconds between two triggered commands with the same action for one run."
    )
    command_ttl: PositiveSeconds = Field(120.0, description="A command no agent picked up within this long expires.")
    poll_interval: PositiveSeconds = Field(
        1.0, description="How often agents are told to poll for commands (an agent's own poll_interval_s wins)."
    )
    remediation: Annotated[RemediationMode, BeforeValidator(_lower)] = Field(
        "enforce",
        description="`enforce`: policies issue commands. `observe`: every decision is made, audited and shown on "
        "the alert's notification as 'would apply X at step N', and nothing is sent: measure false alarms on "
        "your own runs before you enforce. A rule's own `remediation:` wins.",
    )
    restore_after: Annotated[SpanField, NoDecode] = Field(
        Span(seconds=300.0),
        description="Undo: once every remediating alert of a run has resolved and the run has been healthy this "
        "long (a duration, or optimizer steps like '300 steps'), the watchdog raises the LR scale back x2 per "
        "step and then disables the clipping it enabled, one command per restore_after.",
    )
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body the API reads (bytes); a larger one is refused 413 "
        "before it is read, authenticated or not.",
    )
    registration_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts a registration's metrics URL may name besides the registering client's own address: "
        "names, addresses or CIDR networks (e.g. a scrape proxy); `*` allows any (not recommended).",
    )
    replay_cache_size: int = Field(
        100_000, ge=1, description="Signatures remembered to refuse replays within the 300-s signing window.",
    )
    refusal_audit_window: PositiveSeconds = Field(
        60.0, description="Refused requests: one audit row per client and reason per this long, with a count.",
    )
    audit_max_rows: int | None = Field(
        1_000_000, ge=1000, description="Audit log retention: the oldest rows beyond this many are deleted. None: no cap.",
    )
    audit_max_age: PositiveSeconds | None = Field(
        90 * 86400.0, description="Audit log retention: rows older than this are deleted (default 90d). None: no cap.",
    )
    deadman_alert: bool = Field(
        True, description="Send the always-firing GradwatchWatchdog alert (severity none) to every Alertmanager "
        "notifier while the service is healthy: route it to a dead-man's-switch receiver, so a dead watchdog pages.",
    )
    log_level: Annotated[Literal["debug", "info", "warning", "error", "critical"], BeforeValidator(_lower)] = Field(
        "info", description="Log verbosity."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.prometheus_bearer_token is not None and self.prometheus_username is not None:
            raise ValueError("give prometheus_bearer_token or prometheus_username/password, not both")
        if (self.prometheus_username is None) != (self.prometheus_password is None):
            raise ValueError("prometheus_username and prometheus_password go together")
        if self.registration_expiry < self.stale_after:
            raise ValueError(f"registration_expiry ({self.registration_expiry} s) must be >= stale_after ({self.stale_after} s)")
        if self.target_series_limit < self.target_sample_limit:
            raise ValueError(
                f"target_series_limit ({self.target_series_limit}) must be >= target_sample_limit ({self.target_sample_limit})"
            )
        return self

    def command_secret(self) -> bytes | None:
        """The shared secret as bytes: ``secret_file``'s content, else ``secret``, else None."""
        if self.secret_file is not None:
            return read_secret(str(self.secret_file))
        return self.secret.get_secret_value().encode() if self.secret is not None else None

    def command_limits(self) -> CommandLimits:
        return CommandLimits(
            self.max_commands_per_run, self.command_window, self.command_cooldown, self.command_ttl, self.poll_interval
        )

    def target_limits(self) -> TargetLimits:
        return TargetLimits(
            sample_limit=self.target_sample_limit, series_limit=self.target_series_limit, max_series=self.max_series
        )

    @property
    def source_timeout(self) -> float:
        """Seconds a round's source may take (``scrape_timeout``, else the interval)."""
        return self.scrape_timeout if self.scrape_timeout is not None else self.scrape_interval

    def public_url(self, port: int | None = None) -> str:
        """``external_url``, or the URL the API is bound at (``port``: the port actually bound)."""
        if self.external_url:
            return self.external_url.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port if port is None else port}"
