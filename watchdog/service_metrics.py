"""The watchdog's own health as Prometheus metrics, served at its ``/metrics``.

Two kinds: what happens once per round (durations, whole-source failures) is
observed by the loop into prometheus-client objects; what is state (scrape counts
per run, notifier counters, rule health, runs, alerts) is read from the service
when scraped, by one collector, so nothing is counted twice. Everything lives in
the service's own registry, never the global one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gradwatch.watchdog.service import Service

ROUND_DURATION = "gradwatch_watchdog_round_duration_seconds"  # source + evaluation + bookkeeping
EVALUATION_DURATION = "gradwatch_watchdog_evaluation_duration_seconds"  # all rules, one round
SOURCE_FAILURES = "gradwatch_watchdog_source_failures"  # _total: a whole round got no samples
ROUND_OVERRUNS = "gradwatch_watchdog_round_overruns"  # _total: a round took longer than the interval
SCRAPES = "gradwatch_watchdog_scrapes"  # _total {run, rank}
SCRAPE_FAILURES = "gradwatch_watchdog_scrape_failures"  # _total {run, rank}
NOTIFICATIONS_SENT = "gradwatch_watchdog_notifications_sent"  # _total {notifier}: alerts delivered
NOTIFICATIONS_FAILED = "gradwatch_watchdog_notifications_failed"  # _total {notifier}: failed attempts
NOTIFICATIONS_DROPPED = "gradwatch_watchdog_notifications_dropped"  # _total {notifier}: given up
NOTIFICATION_QUEUE = "gradwatch_watchdog_notification_queue_length"  # {notifier}
RULE_HEALTHY = "gradwatch_watchdog_rule_healthy"  # {rule}: 1 ok, 0 failing; absent before the first evaluation
RULE_FAILURES = "gradwatch_watchdog_rule_evaluation_failures"  # _total {rule}
RULE_DURATION = "gradwatch_watchdog_rule_evaluation_duration_seconds"  # {rule}: last evaluation
RUNS = "gradwatch_watchdog_runs"  # {state: live|stale}
ALERTS = "gradwatch_watchdog_alerts"  # {state: pending|firing|resolved}
SERIES = "gradwatch_watchdog_series"  # series held in memory

_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    """The service's registry, with the objects its loop updates every round."""

    def __init__(self, service: Service) -> None:
        self.registry = CollectorRegistry()
        self.round_duration = Histogram(
            ROUND_DURATION, "Duration of one round: source, rule evaluation, store and hand-over to notifiers.",
            buckets=_SECONDS_BUCKETS, registry=self.registry,
        )
        self.evaluation_duration = Histogram(
            EVALUATION_DURATION, "Duration of evaluating every rule once.", buckets=_SECONDS_BUCKETS, registry=self.registry
        )
        self.source_failures = Counter(
            SOURCE_FAILURES, "Rounds whose source failed as a whole (e.g. Prometheus unreachable).", registry=self.registry
        )
        self.round_overruns = Counter(
            ROUND_OVERRUNS, "Rounds that took longer than the scrape interval.", registry=self.registry
        )
        self.registry.register(_StateCollector(service))


class _StateCollector(Collector):
    """Reads the service's state at scrape time."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        yield from self._scrapes()
        yield from self._notifications()
        yield from self._rules()
        snapshot = self.service.snapshot()
        runs = GaugeMetricFamily(RUNS, "Registered runs by state.", labels=["state"])
        stale = sum(1 for t in self.service.registry.targets() if t.stale)
        runs.add_metric(["live"], len(self.service.registry.targets()) - stale)
        runs.add_metric(["stale"], stale)
        yield runs
        alerts = GaugeMetricFamily(ALERTS, "Alerts held, by state.", labels=["state"])
        for state, count in snapshot.alerts_by_state.items():
            alerts.add_metric([state], count)
        yield alerts
        yield GaugeMetricFamily(SERIES, "Series held in memory.", value=snapshot.series)

    def _scrapes(self) -> Iterator[Metric]:
        source = self.service.source
        # dict() copies in one step: the loop thread may add a target meanwhile.
        attempts, failures = dict(getattr(source, "scrapes_total", {})), dict(getattr(source, "scrape_failures_total", {}))
        total = CounterMetricFamily(SCRAPES, "Scrape attempts per registered run.", labels=["run", "rank"])
        failed = CounterMetricFamily(SCRAPE_FAILURES, "Failed scrapes per registered run.", labels=["run", "rank"])
        for (run, rank), n in sorted(attempts.items()):
            total.add_metric([run, str(rank)], n)
            failed.add_metric([run, str(rank)], failures.get((run, rank), 0))
        yield total
        yield failed

    def _notifications(self) -> Iterator[Metric]:
        stats = self.service.dispatcher.stats()
        families = {
            "sent_total": CounterMetricFamily(NOTIFICATIONS_SENT, "Alerts delivered, per notifier.", labels=["notifier"]),
            "failures_total": CounterMetricFamily(
                NOTIFICATIONS_FAILED, "Failed delivery attempts, per notifier.", labels=["notifier"]
            ),
            "dropped_total": CounterMetricFamily(
                NOTIFICATIONS_DROPPED, "Alerts given up undelivered, per notifier.", labels=["notifier"]
            ),
            "queued": GaugeMetricFamily(NOTIFICATION_QUEUE, "Alerts waiting for delivery, per notifier.", labels=["notifier"]),
        }
        for name, s in sorted(stats.items()):
            for attr, family in families.items():
                family.add_metric([name], getattr(s, attr))
        yield from families.values()

    def _rules(self) -> Iterator[Metric]:
        healthy = GaugeMetricFamily(RULE_HEALTHY, "1 if the rule's last evaluation succeeded, 0 if it failed.", labels=["rule"])
        failures = CounterMetricFamily(RULE_FAILURES, "Failed evaluations per rule.", labels=["rule"])
        duration = GaugeMetricFamily(RULE_DURATION, "Duration of the rule's last evaluation.", labels=["rule"])
        for name, h in sorted(self.service.snapshot().rule_health.items()):
            if h.state != "unknown":
                healthy.add_metric([name], 1.0 if h.state == "ok" else 0.0)
            failures.add_metric([name], h.errors_total)
            duration.add_metric([name], h.last_duration_s)
        yield healthy
        yield failures
        yield duration
