"""Delivers alerts to every notifier in the background, with retries, and audits each attempt.

The service loop calls :meth:`Dispatcher.submit` after each evaluation with the
alerts the engine says need sending. ``submit`` only copies them into one bounded
queue per notifier and returns: a slow or dead notifier can never stall
evaluation. One worker thread per notifier then decides, per alert, whether that
notifier is due to hear about it (:func:`should_send`, from the deliveries kept in
the store, so a restart does not re-notify), sends what is due as one request,
and on failure retries with exponential backoff and jitter. While a notifier is
down, a newer state of an alert replaces the queued one, and when the queue is
full the oldest alert is dropped and counted.

Delivery is at-least-once: a crash between a notifier's 2xx and the store's commit
re-sends that notification after the restart.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from gradwatch.watchdog.alert import Alert, AlertState
from gradwatch.watchdog.notify.alertmanager import alert_status, started_at
from gradwatch.watchdog.store import Delivery, Store

log = logging.getLogger(__name__)

DROP_SAMPLE = 20  # fingerprints listed in one notify.dropped audit entry


class Notifier(Protocol):
    """What the dispatcher needs from a notifier: it formats and sends, deciding nothing."""

    name: str
    send_resolved: bool
    repeat_interval_s: float

    def send(self, alerts: Sequence[Alert], now: float) -> None:
        """Deliver all ``alerts`` in one request; raise on any failure."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Backoff:
    """Delay before retry ``n`` (1-based): ``min(max_s, base_s·2^(n-1))`` scaled by a random factor in [0.5, 1]."""

    base_s: float = 0.5
    max_s: float = 30.0

    def delay(self, failures: int, rng: random.Random) -> float:
        # The jitter keeps several watchdogs (or notifiers) from retrying in lock-step.
        return min(self.max_s, self.base_s * 2 ** max(0, failures - 1)) * rng.uniform(0.5, 1.0)


@dataclass
class NotifierStats:
    """One notifier's counters, for the service's own /metrics and health endpoint."""

    sent_total: int = 0  # alerts delivered
    failures_total: int = 0  # failed delivery attempts (requests)
    dropped_total: int = 0  # alerts given up undelivered (queue full, or shutdown)
    queued: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    last_sent_at: float | None = None


def should_send(
    alert: Alert, deliveries: Mapping[tuple[str, str], Delivery], send_resolved: bool, repeat_s: float, now: float
) -> bool:
    """Whether a notifier whose past deliveries are ``deliveries`` is due to hear about ``alert`` now.

    Firing: never told about this firing episode, or told ``repeat_s`` ago or more.
    Resolved: only if ``send_resolved`` and it was told this episode fired, once.
    """
    episode = started_at(alert)
    fired = deliveries.get((alert.fingerprint, "firing"))
    told_fired = fired is not None and fired.episode == episode
    if alert_status(alert) == "firing":
        return not told_fired or now - fired.sent_at >= repeat_s  # type: ignore[union-attr]
    if not send_resolved or not told_fired:
        return False
    resolved = deliveries.get((alert.fingerprint, "resolved"))
    return resolved is None or resolved.episode != episode


def _notifiable(alert: Alert) -> bool:
    return alert.state == AlertState.FIRING or alert.resolved_at is not None


class _Lane:
    """One notifier's queue and worker thread."""

    def __init__(
        self,
        notifier: Notifier,
        store: Store,
        clock: Callable[[], float],
        max_queue: int,
        max_batch: int,
        backoff: Backoff,
        rng: random.Random,
    ) -> None:
        self.notifier = notifier
        self.name = notifier.name
        self.store = store
        self.clock = clock
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.backoff = backoff
        self.rng = rng
        self.cond = threading.Condition()
        self.pending: OrderedDict[str, Alert] = OrderedDict()  # fingerprint → newest snapshot, oldest first
        self.stats = NotifierStats()
        self.retry_at = 0.0  # time.monotonic() before which no attempt is made
        self.busy = False
        self.closing = False
        self.gave_up = False
        self.unaudited_drops: list[tuple[str, str]] = []  # (reason, fingerprint), written by the worker
        self.unaudited_drop_count = 0
        self.thread = threading.Thread(target=self._run, name=f"gradwatch-notify-{self.name}", daemon=True)

    # -- caller side (never blocks on I/O) --

    def put(self, alerts: Iterable[Alert]) -> None:
        with self.cond:
            if self.closing:
                return
            for alert in alerts:
                if alert.state != AlertState.FIRING and not self.notifier.send_resolved:
                    continue
                self.pending[alert.fingerprint] = alert  # a newer state replaces the queued one
                self.pending.move_to_end(alert.fingerprint)
            self._trim_locked("queue full")
            self.cond.notify_all()

    def _trim_locked(self, reason: str) -> None:
        while len(self.pending) > self.max_queue:
            fingerprint, _ = self.pending.popitem(last=False)
            self._drop_locked(reason, fingerprint)
        self.stats.queued = len(self.pending)

    def _drop_locked(self, reason: str, fingerprint: str) -> None:
        self.stats.dropped_total += 1
        self.unaudited_drop_count += 1
        if len(self.unaudited_drops) < DROP_SAMPLE:
            self.unaudited_drops.append((reason, fingerprint))

    # -- worker side --

    def _next_batch(self) -> list[Alert] | None:
        """Block until a batch is due; None once closing with nothing (deliverable) left."""
        with self.cond:
            while True:
                if self.closing and (not self.pending or self.gave_up):
                    return None
                # On close, skip the backoff wait: one last prompt attempt.
                if self.pending and (self.closing or time.monotonic() >= self.retry_at):
                    batch = [self.pending.popitem(last=False)[1] for _ in range(min(self.max_batch, len(self.pending)))]
                    self.stats.queued = len(self.pending)
                    self.busy = True
                    return batch
                self.cond.wait(max(0.0, self.retry_at - time.monotonic()) if self.pending else None)

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            ok = False
            try:
                ok = self._deliver(batch)
            except Exception:  # a bug here must not kill the notifier's only thread
                log.exception("notifier %s: delivery failed unexpectedly", self.name)
            with self.cond:
                self.busy = False
                if not ok and self.closing:
                    for fingerprint in list(self.pending):
                        self._drop_locked("shutdown", fingerprint)
                    self.pending.clear()
                    self.stats.queued = 0
                    self.gave_up = True
                self.cond.notify_all()
            self._audit_drops()
        self._audit_drops()

    def _deliver(self, batch: list[Alert]) -> bool:
        """Send what is due in ``batch``; True on success (or nothing due), False after a failed attempt."""
        now = self.clock()
        try:
            deliveries = self.store.deliveries(self.name, (a.fingerprint for a in batch))
        except Exception:  # without the history, sending twice beats not sending
            log.exception("notifier %s: cannot read past deliveries; sending anyway", self.name)
            deliveries = {}
        due = [a for a in batch if should_send(a, deliveries, self.notifier.send_resolved, self.notifier.repeat_interval_s, now)]
        if not due:
            return True
        attempt = self.stats.consecutive_failures + 1
        try:
            self.notifier.send(due, now)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            with self.cond:
                self.stats.failures_total += 1
                self.stats.consecutive_failures += 1
                self.stats.last_error, self.stats.last_error_at = error, now
                delay = self.backoff.delay(self.stats.consecutive_failures, self.rng)
                self.retry_at = time.monotonic() + delay
                for alert in reversed(due):  # back to the front, unless a newer state arrived meanwhile
                    if alert.fingerprint not in self.pending:
                        self.pending[alert.fingerprint] = alert
                        self.pending.move_to_end(alert.fingerprint, last=False)
                self._trim_locked("queue full")
            log.warning("notifier %s: attempt %d failed (%s); retrying in %.1fs", self.name, attempt, error, delay)
            self._audit("notify.failed", due, now, attempt=attempt, error=error, retry_in_s=round(delay, 3))
            return False
        with self.cond:
            self.stats.sent_total += len(due)
            self.stats.consecutive_failures = 0
            self.stats.last_sent_at = now
            self.retry_at = 0.0
        try:
            with self.store.transaction():
                self.store.record_deliveries(self.name, [(a.fingerprint, alert_status(a), started_at(a)) for a in due], now)
                self._audit("notify.sent", due, now, attempt=attempt)
        except Exception:
            log.exception("notifier %s: sent, but could not record it (it may be re-sent after a restart)", self.name)
        return True

    def _audit(self, kind: str, alerts: list[Alert], now: float, **details: object) -> None:
        try:
            self.store.append_audit_many(
                dict(
                    kind=kind,
                    time=now,
                    run=a.label("run") or None,
                    rule=a.rule,
                    fingerprint=a.fingerprint,
                    details={"notifier": self.name, "state": alert_status(a), **details},
                )
                for a in alerts
            )
        except Exception:
            log.exception("notifier %s: cannot write %s to the audit log", self.name, kind)

    def _audit_drops(self) -> None:
        with self.cond:
            count, sample = self.unaudited_drop_count, self.unaudited_drops
            self.unaudited_drop_count, self.unaudited_drops = 0, []
        if not count:
            return
        try:
            self.store.append_audit(
                "notify.dropped",
                time=self.clock(),
                details={
                    "notifier": self.name,
                    "count": count,
                    "reasons": sorted({r for r, _ in sample}),
                    "fingerprints": [f for _, f in sample],  # a sample: at most DROP_SAMPLE
                },
            )
        except Exception:
            log.exception("notifier %s: cannot write notify.dropped to the audit log", self.name)


class Dispatcher:
    """Background delivery to ``notifiers``, recording deliveries and attempts in ``store``.

    ``clock`` dates deliveries and decides repeat intervals (the engine's clock in
    the service, a fake one in tests). ``max_queue`` bounds each notifier's queue;
    ``max_batch`` bounds one request (Prometheus sends at most 64 alerts per POST).
    """

    def __init__(
        self,
        notifiers: Iterable[Notifier],
        store: Store,
        clock: Callable[[], float] = time.time,
        *,
        max_queue: int = 1000,
        max_batch: int = 64,
        backoff: Backoff = Backoff(),
        seed: int | None = None,
    ) -> None:
        rng = random.Random(seed)
        self._lanes: dict[str, _Lane] = {}
        for notifier in notifiers:
            if notifier.name in self._lanes:
                raise ValueError(f"two notifiers are named {notifier.name!r}")
            self._lanes[notifier.name] = _Lane(notifier, store, clock, max_queue, max_batch, backoff, random.Random(rng.random()))
        self._closed = False
        for lane in self._lanes.values():
            lane.thread.start()

    @property
    def notifier_names(self) -> list[str]:
        return list(self._lanes)

    def submit(self, alerts: Iterable[Alert], now: float, *, to: Callable[[Notifier], bool] | None = None) -> None:
        """Queue alerts (firing, or resolved) for every notifier and return at once.

        Called by the service loop after each evaluation with the alerts that need
        sending; each notifier then keeps only those it is due to hear about.
        Pending alerts are ignored. ``now`` is the evaluation time (kept for the
        caller's symmetry with the engine; delivery times come from ``clock``).
        ``to``: only the notifiers it accepts (e.g. the dead-man's alert goes to Alertmanager only).
        """
        if self._closed:
            log.warning("dispatcher is closed: alerts submitted after close() are not sent")
            return
        # Snapshots: the engine keeps mutating its Alert objects after this call.
        snapshot = [dataclasses.replace(a, annotations=dict(a.annotations)) for a in alerts if _notifiable(a)]
        if snapshot:
            for lane in self._lanes.values():
                if to is None or to(lane.notifier):
                    lane.put(snapshot)

    def stats(self) -> dict[str, NotifierStats]:
        """A copy of every notifier's counters, by notifier name."""
        result = {}
        for name, lane in self._lanes.items():
            with lane.cond:
                result[name] = dataclasses.replace(lane.stats)
        return result

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queue is empty and no delivery is in flight; False if ``timeout`` ran out first."""
        deadline = time.monotonic() + timeout
        for lane in self._lanes.values():
            with lane.cond:
                while lane.pending or lane.busy:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    lane.cond.wait(remaining)
        return True

    def close(self, timeout: float = 5.0) -> bool:
        """Make one last attempt at what is queued, then stop the workers within ``timeout`` seconds.

        Returns False if a worker was still busy (e.g. a request hanging until its
        HTTP timeout) when the time ran out; that daemon thread is abandoned.
        """
        self._closed = True
        for lane in self._lanes.values():
            with lane.cond:
                lane.closing = True
                lane.cond.notify_all()
        deadline = time.monotonic() + timeout
        stopped = True
        for lane in self._lanes.values():
            lane.thread.join(max(0.0, deadline - time.monotonic()))
            if lane.thread.is_alive():
                stopped = False
                log.warning("notifier %s did not stop within %.1fs", lane.name, timeout)
            else:
                lane.notifier.close()
        return stopped
