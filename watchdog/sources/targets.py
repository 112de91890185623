"""The agents the direct-scrape source scrapes: who registered, where, and who stopped answering.

Agents register over the watchdog's API (at start, after a restart, after a
watchdog restart); the scrape source asks for :meth:`TargetRegistry.targets`
every round and reports back with :meth:`TargetRegistry.mark_scraped`. A target
that has not answered for ``stale_after_s`` seconds is marked stale: its run's
history stays in the store, the API can still show it, and a re-registration (an
agent that came back) clears the mark. One silent for ``expire_after_s`` is
removed by :meth:`TargetRegistry.expire` (its audit history stays). At most
``max_targets`` registrations are held: one more is refused with
:class:`RegistryFull`, so neither the rounds nor memory grow with whoever registers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator
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


class RegistryFull(Exception):
    """A registration refused because ``max_targets`` are held; the message says so and what frees room.

    The HTTP API answers it with 429 (retry later: stale registrations expire).
    """


class TargetRegistry:
    """Registered agents keyed by ``(run, rank)``. Safe to call from the API and the scrape loop at once.

    ``on_change(targets)`` is called after every registration and every change of
    staleness (not after each scrape), outside the registry's lock, so the service
    can persist runs to its store; inside :meth:`batch`, once for all the changes
    the block made (5,000 targets going stale in one round are one transaction, not
    5,000). An exception from it is logged and swallowed: a failing store must not
    stop the watchdog from watching.
    """

    def __init__(
        self,
        stale_after_s: float = 60.0,
        on_change: Callable[[list[Target]], None] | None = None,
        *,
        expire_after_s: float = 3600.0,
        max_targets: int = 10_000,
    ) -> None:
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be > 0 seconds, got {stale_after_s}")
        if expire_after_s < stale_after_s:
            raise ValueError(f"expire_after_s must be >= stale_after_s ({stale_after_s} s), got {expire_after_s}")
        if max_targets < 1:
            raise ValueError(f"max_targets must be >= 1, got {max_targets}")
        self.stale_after_s = stale_after_s
        self.expire_after_s = expire_after_s
        self.max_targets = max_targets
        self._on_change = on_change
        self._targets: dict[TargetKey, Target] = {}
        self._lock = threading.Lock()
        self._batch = threading.local()  # the changes held back by this thread's batch()

    def ensure_room(self, key: TargetKey) -> None:
        """Raise :class:`RegistryFull` if registering ``key`` now would be refused (a new key, the registry full).

        For callers that must refuse before writing anything else; :meth:`register`
        checks again under its lock.
        """
        with self._lock:
            self._check_room(key)

    def _check_room(self, key: TargetKey) -> None:
        if key not in self._targets and len(self._targets) >= self.max_targets:
            raise RegistryFull(
                f"registration refused: the watchdog already holds {len(self._targets)} registrations "
                f"(max_registrations={self.max_targets}); a registration silent for {self.expire_after_s:g} s "
                "expires, and finished runs deregister"
            )

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Hold back this thread's ``on_change`` calls until the block ends, then make one with them all."""
        held: list[Target] = []
        self._batch.held = held
        try:
            yield
        finally:
            self._batch.held = None
            if held:
                self._notify(held)

    def register(self, registration: Registration, now: float, *, stale: bool = False) -> Target:
        """Add an agent, or replace its URL after a restart; clears stale. Samples already stored are kept.

        Raises :class:`RegistryFull` for a new ``(run, rank)`` when ``max_targets`` are held.
        ``stale``: restoring a registration the store holds as stale.
        """
        target = Target(
            run=registration.run,
            rank=registration.rank,
            world_size=registration.world_size,
            metrics_url=str(registration.metrics_url),
            registered_at=now,
            step_at_registration=registration.step,
            stale=stale,
        )
        with self._lock:
            self._check_room(target.key)
            previous = self._targets.get(target.key)
            if previous is not None:
                # Keep when it last answered: the API shows it, and it survives restarts of the agent.
                target = dataclasses.replace(target, last_success=previous.last_success)
            self._targets[target.key] = target
        self._notify([target])
        return target

    def remove(self, key: TargetKey) -> Target | None:
        """Stop watching a target (its run finished and said so); returns it, or None if unknown."""
        with self._lock:
            return self._targets.pop(key, None)

    def expire(self, now: float) -> list[Target]:
        """Remove and return every target silent for ``expire_after_s`` (no answer since then, nor a registration)."""
        horizon = now - self.expire_after_s
        with self._lock:
            gone = [t for t in self._targets.values() if t.silent_since() <= horizon]
            for target in gone:
                del self._targets[target.key]
        return gone

    def __len__(self) -> int:
        with self._lock:
            return len(self._targets)

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
            self._notify([updated])
        return updated

    def _notify(self, targets: list[Target]) -> None:
        held = getattr(self._batch, "held", None)
        if held is not None:
            held.extend(targets)
            return
        if self._on_change is None:
            return
        try:
            self._on_change(targets)
        except Exception:
            log.exception("on_change failed for %d target(s), the first run=%s rank=%s",
                          len(targets), targets[0].run, targets[0].rank)
