"""The agents the direct-scrape source scrapes: who registered, where, and who stopped answering.

Agents register over the watchdog's API (at start, after a restart, after a
watchdog restart); the scrape source asks for :meth:`TargetRegistry.targets`
every round and reports back with :meth:`TargetRegistry.mark_scraped`. A target
that has not answered for ``stale_after_s`` seconds is marked stale, never
deleted: its run's history stays in the store, the API can still show it, and a
re-registration (an agent that came back) clears the mark.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..schema import Registration

log = logging.getLogger(__name__)

TargetKey = tuple[str, int]
"""``(run, rank)``: one agent. A restarted agent keeps its key, so it replaces its old entry."""


@dataclass(frozen=True)
class Target:
    """One registered agent as the registry last knew it; an immutable snapshot."""

    run: str
    rank: int
    world_size: int
    metrics_url: str
    registered_at: float
    step_at_registration: int = 0
    last_attempt: float | None = None
    last_success: float | None = None
    last_error: str | None = None
    stale: bool = False

    @property
    def key(self) -> TargetKey:
        return (self.run, self.rank)

    def silent_since(self) -> float:
        """When this target last answered, or registered if it never answered since."""
        if self.last_success is None or self.last_success < self.registered_at:
            return self.registered_at
        return self.last_success


class TargetRegistry:
    """Registered agents keyed by ``(run, rank)``. Safe to call from the API and the scrape loop at once.

    ``on_change(target)`` is called after every registration and every change of
    staleness (not after each scrape), outside the registry's lock, so the service
    can persist runs to its store. An exception from it is logged and swallowed:
    a failing store must not stop the watchdog from watching.
    """

    def __init__(
        self,
        stale_after_s: float = 60.0,
        on_change: Callable[[Target], None] | None = None,
    ) -> None:
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be > 0 seconds, got {stale_after_s}")
        self.stale_after_s = stale_after_s
        self._on_change = on_change
        self._targets: dict[TargetKey, Target] = {}
        self._lock = threading.Lock()

    def register(self, registration: Registration, now: float) -> Target:
        """Add an agent, or replace its URL after a restart; clears stale. Samples already stored are kept."""
        target = Target(
            run=registration.run,
            rank=registration.rank,
            world_size=registration.world_size,
            metrics_url=str(registration.metrics_url),
            registered_at=now,
            step_at_registration=registration.step,
        )
        with self._lock:
            previous = self._targets.get(target.key)
            if previous is not None:
                # Keep when it last answered: the API shows it, and it survives restarts of the agent.
                target = dataclasses.replace(target, last_success=previous.last_success)
            self._targets[target.key] = target
        self._notify(target)
        return target

    def remove(self, key: TargetKey) -> Target | None:
        """Stop watching a target (its run finished and said so); returns it, or None if unknown."""
        with self._lock:
            return self._targets.pop(key, None)

    def targets(self) -> list[Target]:
        """Every registered target, stale ones included, in registration order."""
        with self._lock:
            return list(self._targets.values())

    def get(self, key: TargetKey) -> Target | None:
        with self._lock:
            return self._targets.get(key)

    def mark_scraped(
        self,
        key: TargetKey,
        now: float,
        ok: bool,
        error: str | None = None,
        *,
        url: str | None = None,
    ) -> Target | None:
        """Record one scrape attempt at ``now``; returns the updated target, or None if it is unknown.

        ``url`` is the URL that was scraped: a result for a URL the target no
        longer has (it re-registered while the scrape was in flight) is ignored.
        """
        with self._lock:
            target = self._targets.get(key)
            if target is None or (url is not None and url != target.metrics_url):
                return None
            if ok:
                updated = dataclasses.replace(target, last_attempt=now, last_success=now, last_error=None, stale=False)
            else:
                silent_for = now - target.silent_since()
                updated = dataclasses.replace(
                    target,
                    last_attempt=now,
                    last_error=error or "scrape failed",
                    stale=target.stale or silent_for >= self.stale_after_s,
                )
            self._targets[key] = updated
        if updated.stale != target.stale:
            self._notify(updated)
        return updated

    def _notify(self, target: Target) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(target)
        except Exception:
            log.exception("on_change failed for target run=%s rank=%s", target.run, target.rank)
