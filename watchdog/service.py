"""The running watchdog: one loop that collects samples, evaluates the rules and hands alerts on.

``gradwatch serve`` builds one :class:`Service` from the settings and the config
file, calls :meth:`Service.start`, serves the HTTP API over it, and calls
:meth:`Service.close` on shutdown. Every ``scrape_interval`` the loop runs one
:meth:`Service.tick`:

1. the source fills the sample store (scrape every registered agent, or one
   Prometheus query) — a dead target only costs its own timeout;
2. the rule engine evaluates every rule at the round's single timestamp;
3. alert transitions go to the audit log and the alert states to the store, in one
   transaction, so a SIGKILL between rounds loses nothing already decided;
4. the alerts due to be sent are handed to the dispatcher, which returns at once:
   a slow notifier never delays the next round.

State that must survive a restart (runs, alert states, deliveries, audit) lives in
the SQLite store and is read back at construction. Tests drive :meth:`tick` with
their own clock instead of starting the loop. Threads: the loop owns the engine;
API handlers read the store and the last round's snapshot; a reload swaps rules
and notifiers under the same lock the loop holds while evaluating.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from gradwatch.watchdog import metric_names as mn
from gradwatch.watchdog.alert import Alert, AlertState
from gradwatch.watchdog.commands import CommandService
from gradwatch.watchdog.config_file import ConfigError, WatchdogConfig, load_config
from gradwatch.watchdog.engine import EvalResult, RuleEngine, RuleHealth
from gradwatch.watchdog.deadman import deadman_alert
from gradwatch.watchdog.notify.alertmanager import AlertmanagerNotifier
from gradwatch.watchdog.incidents import IncidentRecorder, with_incident_link
from gradwatch.watchdog.notify.config import build_notifier
from gradwatch.watchdog.notify.dispatcher import Dispatcher
from gradwatch.watchdog.rules.loader import Problem
from gradwatch.watchdog.judgement import HISTORY_S, JUDGED_METRICS, Evidence, judge
from gradwatch.watchdog.remediation import Remediator
from gradwatch.watchdog.restore import Restorer
from gradwatch.watchdog.rules.policy import Policy
from gradwatch.watchdog.samples import SampleStore, Series
from gradwatch.watchdog.refusals import RefusalAudit
from gradwatch.watchdog.schema import Registration, ReplayGuard
from gradwatch.watchdog.service_metrics import ServiceMetrics
from gradwatch.watchdog.settings import Settings
from gradwatch.watchdog.sources.prometheus import PrometheusSource
from gradwatch.watchdog.sources.scrape import ScrapeSource
from gradwatch.watchdog.sources.targets import RegistryFull, Target, TargetRegistry
from gradwatch.watchdog.store import AuditEntry, RunRecord, Store, WriteHealth

log = logging.getLogger(__name__)

LOGGED_FLIPS = 10  # staleness flips logged one by one per round; the rest as one line
PRUNE_EVERY_S = 60.0  # how often series of runs long gone are dropped from memory
ALERT_STATES = ("pending", "firing", "resolved")


@dataclass(frozen=True)
class RoundReport:
    """What one :meth:`Service.tick` did."""

    now: float
    duration_s: float
    samples: int
    scrape_errors: dict[tuple[str, int], str]
    source_error: str | None
    result: EvalResult


@dataclass(frozen=True)
class Snapshot:
    """The last round as other threads may read it (replaced whole, never mutated)."""

    last_round: RoundReport | None = None
    rule_health: dict[str, RuleHealth] = field(default_factory=dict)
    alerts_by_state: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ALERT_STATES, 0))
    series: int = 0


@dataclass(frozen=True)
class RunStatus:
    """A registered run as stored, with the last scrape error the source saw (if any)."""

    record: RunRecord
    last_error: str | None


@dataclass(frozen=True)
class ReloadResult:
    """The outcome of :meth:`Service.reload`: ``ok``, or the problems that kept the old config."""

    ok: bool
    source: str
    rules: int
    problems: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class Health:
    """For ``/healthz``: ``status`` is ``ok``, ``starting`` (no round yet), ``stalled`` (the loop is stuck or
    dead) or ``unhealthy`` (the store cannot be written)."""

    status: str
    source: str
    last_round_at: float | None
    last_round_duration_s: float | None
    runs: int
    series: int
    rules: dict[str, RuleHealth]
    notifiers: dict[str, object]
    store: WriteHealth = WriteHealth(True)


def alert_status(alert: Alert) -> str:
    """``pending``, ``firing`` or ``resolved`` (an INACTIVE alert held only to send its resolution)."""
    return "resolved" if alert.state == AlertState.INACTIVE else str(alert.state)


def format_value(v: float) -> str:
    """An alert value as Prometheus's API writes it: NaN and ±Inf are not JSON numbers."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def build_source(settings: Settings, registry: TargetRegistry, samples: SampleStore) -> ScrapeSource | PrometheusSource:
    """The source ``settings`` ask for: Prometheus's API when ``prometheus_url`` is set, else direct scraping."""
    if settings.prometheus_url is None:
        return ScrapeSource(
            registry, samples, timeout_s=settings.source_timeout,
            max_in_flight=settings.scrape_concurrency, limits=settings.target_limits(),
        )
    token = settings.prometheus_bearer_token
    auth = None
    if settings.prometheus_username is not None and settings.prometheus_password is not None:
        auth = (settings.prometheus_username, settings.prometheus_password.get_secret_value())
    return PrometheusSource(
        str(settings.prometheus_url),
        samples,
        timeout_s=settings.source_timeout,
        bearer_token=token.get_secret_value() if token is not None else None,
        basic_auth=auth,
    )


class RegistrationRefused(Exception):
    """A (de)registration that would take a live run away from its own agent; the message says why."""


class Service:
    """The watchdog: sources, rules, alert state, notifications and the store, driven by one loop.

    ``config`` defaults to ``load_config(settings.config)``. ``store`` (else opened at
    ``settings.db``), ``samples`` and ``source`` (else :func:`build_source`) may be
    given by tests; a given ``source`` must fill the given ``samples``. ``clock``
    dates everything: rounds, registrations, alerts, deliveries, audit entries.
    """

    def __init__(
        self,
        settings: Settings,
        config: WatchdogConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        store: Store | None = None,
        samples: SampleStore | None = None,
        source: ScrapeSource | PrometheusSource | None = None,
        external_url: str | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = os.fspath(settings.config) if settings.config is not None else None
        self.config = config if config is not None else load_config(self.config_path)
        self.clock = clock
        self.external_url = external_url if external_url is not None else settings.public_url()
        self._owns_store = store is None
        self.store = store if store is not None else Store(
            settings.db, audit_max_rows=settings.audit_max_rows, audit_max_age_s=settings.audit_max_age
        )
        try:
            self.samples = samples if samples is not None else SampleStore()
            self.registry = TargetRegistry(
                settings.stale_after, on_change=self._on_target_change,
                expire_after_s=settings.registration_expiry, max_targets=settings.max_registrations,
            )
            self._restore_runs()
            self.source = source if source is not None else build_source(settings, self.registry, self.samples)
            self.engine = RuleEngine(self.config.rules)
            self.samples.set_retention(self._history_needed())  # keep what the rules and the judgement read, no more
            restored = self.engine.restore(self.store.alerts())
            self.dispatcher = self._build_dispatcher(self.config)
            self.commands = CommandService(self.store, settings.command_secret(), settings.command_limits(), clock)
            self.remediator = Remediator(
                self.commands, self._policies, judge=self._judge, progress=self._progress, mode=settings.remediation
            )
            self.restorer = Restorer(
                self.commands, self._policies, runs=lambda: [t.run for t in self.registry.targets()],
                healthy=lambda run, start, now: judge(self.samples, run, None, start, now, nonfinite_lookback_s=0.0),
                progress=self._progress, restore_after=settings.restore_after, mode=settings.remediation,
            )
            self.replay_guard = ReplayGuard(settings.replay_cache_size)
            self.refusals = RefusalAudit(self.store, clock, settings.refusal_audit_window)
            self.incidents = IncidentRecorder(self.store)
        except BaseException:
            if self._owns_store:
                self.store.close()
            raise
        if restored:
            log.info("restored %d alert(s) from %s", restored, self.store.path)
        self._lock = threading.Lock()  # the engine and dispatcher: the loop vs a reload
        self._snapshot = Snapshot(rule_health=self.engine.health(), alerts_by_state=_count_states(self.engine.alerts()))
        self._last_prune = -math.inf
        self._deadman = deadman_alert(clock())  # one firing episode per process
        self._retention: dict[str, float] | None = None  # new rules' history needs, for the next round
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.metrics = ServiceMetrics(self)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Offer the restored alerts to the notifiers, then start the background loop (first round at once)."""
        if self._thread is not None:
            raise RuntimeError("the service is already started")
        self.offer_restored_alerts()
        self._thread = threading.Thread(target=self._loop, name="gradwatch-loop", daemon=True)
        self._thread.start()

    def offer_restored_alerts(self) -> None:
        """Hand every alert held to the notifiers once, at start-up.

        A notification whose delivery was not recorded before a crash is sent now
        instead of after the resend delay; the deliveries the store remembers make
        every notifier skip what it was already told.
        """
        with self._lock:
            self.dispatcher.submit(self.engine.alerts(), self.clock())

    def close(self) -> None:
        """Stop the loop (within one round's time), give notifiers a last attempt, close everything. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.settings.scrape_interval + self.settings.source_timeout + 10.0)
            if self._thread.is_alive():
                log.warning("the evaluation loop did not stop in time; abandoning it")
        self.dispatcher.close()
        self.source.close()
        self.refusals.flush()
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _loop(self) -> None:
        interval = self.settings.scrape_interval
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a bug in one round must not end the watching
                log.exception("evaluation round failed")
            next_at += interval
            delay = next_at - time.monotonic()
            if delay < 0:  # late: start the next round now rather than bunching the missed ones
                self.metrics.round_overruns.inc()
                next_at, delay = time.monotonic(), 0.0
            self._stop.wait(delay)

    # -- one round -----------------------------------------------------------------------

    def tick(self, now: float | None = None) -> RoundReport:
        """One round at ``now`` (default: the clock): collect, evaluate, record, hand over to notifiers."""
        now = self.clock() if now is None else now
        started = time.perf_counter()
        with self._lock:
            retention, self._retention = self._retention, None
        if retention is not None:
            self.samples.set_retention(retention)
        samples, scrape_errors, source_error = self._collect(now)
        self._record_progress(now)
        with self._lock:
            eval_started = time.perf_counter()
            result = self.engine.eval(now, self.samples)
            self.metrics.evaluation_duration.observe(time.perf_counter() - eval_started)
            alerts = self.engine.alerts()
            health = self.engine.health()
            self._record(now, result, alerts, health)
            # Decide first, so the notification of a firing alert already says what was done about it.
            # A store that cannot be written (a full disk) logged it once and /healthz reports it
            # (the dead-man's alert stops): the round goes on, remediation waits for the store.
            with contextlib.suppress(sqlite3.OperationalError):
                self.remediator.decide(alerts, now)
                self.restorer.decide(alerts, now)
                self._observe_incidents(now, alerts)
            to_send = self.engine.alerts_to_send(now, self.settings.resend_delay)
            self._annotate(to_send, now)
            self.dispatcher.submit([with_incident_link(a, self.external_url) for a in to_send], now)
            if self.settings.deadman_alert and self.store.write_health().writable:
                self.dispatcher.submit([self._deadman], now, to=lambda n: isinstance(n, AlertmanagerNotifier))
        if now - self._last_prune >= PRUNE_EVERY_S:
            self.samples.drop_older_than(now - self.samples.max_age_s)
            self._last_prune = now
        duration = time.perf_counter() - started
        self.metrics.round_duration.observe(duration)
        report = RoundReport(now, duration, samples, scrape_errors, source_error, result)
        self._snapshot = Snapshot(report, health, _count_states(alerts), self.samples.series_count())
        return report

    def _collect(self, now: float) -> tuple[int, dict[tuple[str, int], str], str | None]:
        try:
            if isinstance(self.source, PrometheusSource):
                return self.source.fetch(now).samples, {}, None
            result = self.source.scrape_all(now)
            self._forget_expired(result.expired, now)
            return result.samples, result.errors, None
        except Exception as exc:  # e.g. Prometheus unreachable: evaluate on what is held
            self.metrics.source_failures.inc()
            error = f"{type(exc).__name__}: {exc}"
            log.warning("source round failed: %s", error)
            return 0, {}, error

    def _observe_incidents(self, now: float, alerts: list[Alert]) -> None:
        try:
            self.dispatcher.submit(self.incidents.observe(now, alerts, self.samples, self.external_url), now)
        except Exception:  # the record is for people; the watching goes on without it
            log.exception("cannot update the incident records")

    def _record_progress(self, now: float) -> None:
        """Persist when each registered run was last seen and its step (one transaction)."""
        steps: dict[tuple[str, str], Series] = {}  # one pass over the step series, not one per target
        for series in self.samples.select(mn.STEP):
            steps.setdefault((series.label("run"), series.label("rank")), series)
        seen = []
        for target in self.registry.targets():
            step = steps.get((target.run, str(target.rank)))
            point = step.points[-1] if step is not None and step.points else None
            if point is not None and point[0] == now:  # sampled in this very round
                seen.append((target, int(point[1]) if math.isfinite(point[1]) else None))
        if not seen:
            return
        try:
            with self.store.transaction():
                for target, step_value in seen:
                    self.store.touch_run(target.run, target.rank, now, step_value)
        except sqlite3.OperationalError:
            pass  # a store that cannot be written logs it once and /healthz reports it, not every round
        except Exception:
            log.exception("cannot record run progress in the store")

    def _record(self, now: float, result: EvalResult, alerts: list[Alert], health: dict[str, RuleHealth]) -> None:
        """Audit this round's transitions and save every alert's state, atomically."""
        entries = [_alert_entry(f"alert.{alert_status(a)}", a, now) for a in result.changed]
        # A dropped pending alert never fired (its condition cleared before `for`), or a
        # rule over its limit forgot its alerts; resolved ones past retention are routine.
        entries += [_alert_entry("alert.dropped", a, now) for a in result.dropped if a.state != AlertState.INACTIVE]
        before = self._snapshot.rule_health
        for name, h in health.items():
            was = before.get(name)
            if h.state == "err" and (was is None or was.state != "err"):
                entries.append(dict(kind="rule.failed", time=now, rule=name, details={"error": h.last_error}))
            elif h.state == "ok" and was is not None and was.state == "err":
                entries.append(dict(kind="rule.recovered", time=now, rule=name))
        for name, error in result.errors.items():
            log.warning("rule %s failed: %s", name, error)
        try:
            with self.store.transaction():
                if entries:
                    self.store.append_audit_many(entries)
                self.store.replace_alerts(alerts)
        except sqlite3.OperationalError:
            pass  # a store that cannot be written logs it once and /healthz reports it, not every round
        except Exception:
            log.exception("cannot save alert states to the store")

    # -- runs ----------------------------------------------------------------------------

    def register(self, registration: Registration, *, authenticated: bool = True) -> RunStatus:
        """An agent (re-)registers: persist it, then scrape it from the next round on.

        A live registration (answering within ``stale_after``) of another agent instance is
        replaced only by an ``authenticated`` caller (signed with the secret, or in-process):
        anyone else gets :class:`RegistrationRefused`, so an anonymous client cannot redirect a run.
        Raises :class:`~gradwatch.watchdog.sources.targets.RegistryFull` (nothing stored) for a
        new (run, rank) while ``max_registrations`` are held.
        """
        self.registry.ensure_room((registration.run, registration.rank))
        now = self.clock()
        with self.store.transaction():
            previous = next(iter(self.store.runs(run=registration.run, rank=registration.rank)), None)
            if not authenticated and previous is not None and self._held_by_another(previous, registration, now):
                raise RegistrationRefused(
                    f"run {registration.run!r} rank {registration.rank} is registered by another live agent "
                    f"instance; it can be replaced once it has not answered for {self.settings.stale_after:g} s "
                    "(stale_after), or by a request signed with the secret"
                )
            record = self.store.register_run(registration, now)
            self.store.append_audit(
                "run.registered",
                time=now,
                run=registration.run,
                details={"rank": registration.rank, "metrics_url": str(registration.metrics_url), "step": registration.step},
            )
        self.registry.register(registration, now)
        return RunStatus(record, None)

    def _held_by_another(self, previous: RunRecord, registration: Registration, now: float) -> bool:
        live = not previous.stale and now - previous.last_seen < self.settings.stale_after
        return live and previous.instance is not None and previous.instance != registration.instance

    def deregister(self, run: str, rank: int, *, instance: str | None = None, authenticated: bool = True) -> bool:
        """A run finished cleanly: stop scraping it and forget its series, so its silence is not a stall.

        An unauthenticated caller must name the registration's own ``instance``
        (:class:`RegistrationRefused` otherwise).
        """
        now = self.clock()
        if not authenticated:
            record = next(iter(self.store.runs(run=run, rank=rank)), None)
            if record is None:
                return False
            if record.instance is None or instance != record.instance:
                raise RegistrationRefused(
                    f"run {run!r} rank {rank} may be deregistered only by its own agent (instance=...) "
                    "or by a request signed with the secret"
                )
        target = self.registry.remove((run, rank))
        with self._lock:
            self.samples.drop_matching({"run": run, "rank": str(rank)})
        with self.store.transaction():
            removed = self.store.remove_run(run, rank)
            self.store.append_audit("run.finished", time=now, run=run, details={"rank": rank})
        return bool(target or removed)

    def _policies(self) -> dict[str, Policy]:
        """Each rule's on_fire steps and mode (read at decision time, so a reload takes effect at once)."""
        return {r.name: Policy(r.on_fire, r.remediation) for r in self.config.rules if r.on_fire}

    def _judge(self, alert: Alert, now: float) -> Evidence:
        """The evidence of harm to the alert's run (and rank) since the alert's condition began."""
        return judge(self.samples, alert.label("run"), alert.label("rank") or None, alert.active_at, now)

    def _latest(self, metric: str, match: dict[str, str]) -> float | None:
        """The newest finite value of ``metric`` among the series matching ``match`` (the largest, if several)."""
        values = [s.points[-1][1] for s in self.samples.select(metric, match) if s.points]
        finite = [v for v in values if math.isfinite(v)]
        return max(finite) if finite else None

    def _progress(self, run: str) -> int | None:
        """The run's optimizer step as last scraped (its furthest rank)."""
        step = self._latest(mn.STEP, {"run": run})
        return int(step) if step is not None else None

    def _annotate(self, alerts: list[Alert], now: float) -> None:
        """What a notification should say beyond the rule's text: the run's step, the step the agent's
        guard last held, and what the watchdog decided about the alert."""
        for alert in alerts:
            run, rank = alert.label("run"), alert.label("rank")
            if run:
                match = {"run": run, **({"rank": rank} if rank else {})}
                for name, metric in (("step", mn.STEP), ("guard_held_step", mn.GUARD_HELD_STEP)):
                    value = self._latest(metric, match)
                    if value is not None:
                        alert.annotations.setdefault(name, str(int(value)))
            note = self.remediator.notes.get((alert.rule, alert.fingerprint))
            if note is not None:
                alert.annotations["remediation"] = note

    def _history_needed(self) -> dict[str, float]:
        """Seconds of history per metric: what the rules read, and what judging an incident reads."""
        need = self.engine.history_needed()
        for metric in JUDGED_METRICS:
            need[metric] = max(need.get(metric, 0.0), HISTORY_S)
        return need

    def runs(self, run: str | None = None) -> list[RunStatus]:
        """Registered runs (stale ones included) as stored, with their last scrape error."""
        out = []
        for record in self.store.runs(run=run):
            target = self.registry.get((record.run, record.rank))
            out.append(RunStatus(record, target.last_error if target is not None else None))
        return out

    def _restore_runs(self) -> None:
        for r in self.store.runs():
            try:
                registration = Registration(
                    run=r.run, rank=r.rank, world_size=r.world_size, metrics_url=r.metrics_url,
                    step=r.last_step or 0, pid=r.pid, hostname=r.hostname, instance=r.instance,
                )
            except ValueError as exc:  # a row this version cannot use must not stop the others
                log.warning("not watching stored run %s rank %d: %s", r.run, r.rank, exc)
                continue
            # Registered "at" its last sighting, so staleness and expiry count from then.
            try:
                self.registry.register(registration, r.last_seen, stale=r.stale)
            except RegistryFull:
                log.warning("not watching stored run %s rank %d: max_registrations reached", r.run, r.rank)

    def _forget_expired(self, expired: list[Target], now: float) -> None:
        """Remove registrations silent for ``registration_expiry`` from the store, in one transaction."""
        if not expired:
            return
        try:
            with self.store.transaction():
                for target in expired:
                    self.store.remove_run(target.run, target.rank)
                self.store.append_audit_many(
                    dict(kind="run.expired", time=now, run=t.run, details={"rank": t.rank, "silent_since": t.silent_since()})
                    for t in expired
                )
        except Exception:
            log.exception("cannot record %d expired registration(s) in the store", len(expired))
        log.info("%d registration(s) expired after %g s without an answer", len(expired), self.settings.registration_expiry)

    def _on_target_change(self, targets: list[Target]) -> None:
        """Persist staleness flips (a round's, in one transaction); registrations are already stored."""
        flips = [t for t in targets if t.last_attempt is not None]
        if not flips:
            return
        with self.store.transaction():
            for target in flips:
                kind = "run.stale" if target.stale else "run.recovered"
                details = {"rank": target.rank, "error": target.last_error} if target.stale else {"rank": target.rank}
                self.store.set_stale(target.run, target.rank, target.stale)
                self.store.append_audit(kind, time=target.last_attempt, run=target.run, details=details)
        for target in flips[:LOGGED_FLIPS]:
            log.log(logging.WARNING if target.stale else logging.INFO, "run %s rank %d is %s", target.run, target.rank,
                    "stale: " + str(target.last_error) if target.stale else "answering again")
        rest = flips[LOGGED_FLIPS:]
        if rest:
            stale = sum(t.stale for t in rest)
            log.warning("... and %d more runs: %d stale, %d answering again", len(rest), stale, len(rest) - stale)

    # -- alerts and audit ----------------------------------------------------------------

    def alerts(self, *, run: str | None = None, state: str | None = None, rule: str | None = None) -> list[Alert]:
        """Alerts as of the last round: pending, firing, and recently resolved (``state`` filters)."""
        stored = None if state is None else ("inactive" if state == "resolved" else state)
        return self.store.alerts(run=run, rule=rule, state=stored)

    def alert_history(
        self, *, run: str | None = None, rule: str | None = None, fingerprint: str | None = None,
        since: float | None = None, limit: int = 100,
    ) -> list[AuditEntry]:
        """Past alert transitions, newest first."""
        return self.store.alert_history(run=run, rule=rule, fingerprint=fingerprint, since=since, limit=limit)

    def audit(
        self, *, run: str | None = None, kind: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[AuditEntry]:
        """Audit entries, newest first; ``kind`` ending in ``.`` selects a family (``notify.``)."""
        return self.store.audit(run=run, kind=kind, since=since, limit=limit, newest_first=True)

    # -- reload and health ---------------------------------------------------------------

    def reload(self, path: str | os.PathLike[str] | None = None) -> ReloadResult:
        """Re-read the config file (``path``, else the one in use) and switch to it if it is valid.

        A bad file changes nothing and its problems are returned. Unchanged rules keep
        their alerts; notifiers are rebuilt only if their settings changed.
        """
        if path is not None:
            self.config_path = os.fspath(path)
        source = self.config_path or "<built-in defaults>"
        now = self.clock()
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            self.store.append_audit(
                "config.reload_failed", time=now, details={"source": source, "problems": [str(p) for p in exc.problems]}
            )
            log.error("reload refused, the previous config stays in force:\n%s", exc.report())
            return ReloadResult(False, source, len(self.config.rules), exc.problems)
        old_names = {r.name: r for r in self.config.rules}
        retired = None
        with self._lock:
            self.engine.replace_rules(config.rules)
            self._retention = self._history_needed()  # applied by the loop, which owns the samples
            if config.notifiers != self.config.notifiers:
                retired, self.dispatcher = self.dispatcher, self._build_dispatcher(config)
            self.config = config
        if retired is not None:
            retired.close()  # one last attempt at what it still holds; outside the lock
        new_names = {r.name: r for r in config.rules}
        details = {
            "source": source,
            "rules": len(config.rules),
            "added": sorted(new_names.keys() - old_names.keys()),
            "removed": sorted(old_names.keys() - new_names.keys()),
            "changed": sorted(n for n in new_names.keys() & old_names.keys() if new_names[n] != old_names[n]),
            "notifiers_changed": retired is not None,
        }
        self.store.append_audit("config.reloaded", time=now, details=details)
        log.info("config reloaded from %s: %d rules", source, len(config.rules))
        return ReloadResult(True, source, len(config.rules))

    def snapshot(self) -> Snapshot:
        """The last round's results (safe from any thread)."""
        return self._snapshot

    def health(self) -> Health:
        snap = self._snapshot
        last = snap.last_round
        status = "ok"
        store = self.store.write_health(probe_every_s=self.settings.scrape_interval)
        if not store.writable:
            status = "unhealthy"  # alerts and commands decided now would not survive a restart
        elif self._thread is not None and (not self._thread.is_alive() and not self._stop.is_set()):
            status = "stalled"  # the loop died
        elif last is None:
            status = "starting"
        elif self._thread is not None:
            late_after = 3 * self.settings.scrape_interval + self.settings.source_timeout
            if self.clock() - last.now > late_after:
                status = "stalled"
        return Health(
            status=status,
            source="prometheus" if isinstance(self.source, PrometheusSource) else "scrape",
            last_round_at=last.now if last else None,
            last_round_duration_s=last.duration_s if last else None,
            runs=len(self.registry.targets()),
            series=snap.series,
            rules=snap.rule_health,
            notifiers={name: dataclasses.asdict(s) for name, s in self.dispatcher.stats().items()},
            store=store,
        )

    def _build_dispatcher(self, config: WatchdogConfig) -> Dispatcher:
        notifiers = [build_notifier(c, external_url=self.external_url) for c in config.notifiers]
        return Dispatcher(notifiers, self.store, self.clock)


def _alert_entry(kind: str, alert: Alert, now: float) -> dict:
    return dict(
        kind=kind,
        time=now,
        run=alert.label("run") or None,
        rule=alert.rule,
        fingerprint=alert.fingerprint,
        details={"labels": dict(alert.labels), "value": format_value(alert.value), "state": str(alert.state)},
    )


def _count_states(alerts: list[Alert]) -> dict[str, int]:
    counts = Counter(alert_status(a) for a in alerts)
    return {s: counts.get(s, 0) for s in ALERT_STATES}
