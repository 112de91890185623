"""The embedded source: scrape every registered agent's ``/metrics`` directly.

The service calls :meth:`ScrapeSource.scrape_all` once per evaluation interval,
then evaluates the rules on the store. Every sample of a round is stored with
the round's single timestamp, so a rule comparing layers or runs sees aligned
points. A target that refuses, times out, answers garbage or answers slowly is
counted and reported, never lets the round fail, and never delays another:

- one deadline (``timeout_s`` from the round's start) covers each target's whole
  exchange, connection, status line, headers and body (:mod:`.deadline`), and the
  round waits for its targets no longer than that;
- targets are scraped concurrently by ``max_in_flight`` workers, those that
  answered last time first, the others by turns, so a crowd of dead ones cannot
  queue ahead of them; a due target no worker reached by the deadline is skipped,
  not failed, and goes first next round;
- a target whose last scrape ran into the deadline or a limit, or that is stale, is
  scraped by workers of its own (no more than are free) and the round does not wait for it;
  one still in flight is not scraped again meanwhile;
- :class:`TargetLimits` bound what one target may put in memory (Prometheus's
  ``sample_limit``, plus a limit on the series it holds, which bounds label churn);
  over a limit its scrape fails with the reason and its samples are dropped;
- the error kept as a target's ``last_error`` is a status code or a fixed
  description, never text from the response: the API shows it to anyone.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import httpcore

from ..samples import SampleStore
from .deadline import DeadlineBackend, deadline
from .parse import ExpositionParser, ParsedSamples, count_samples
from .targets import Target, TargetKey, TargetRegistry


def _package_version() -> str:
    try:
        return version("gradwatch")
    except PackageNotFoundError:
        return "unknown"


USER_AGENT = f"gradwatch-watchdog/{_package_version()}"
# Ask for the classic text format: it is what parse.py reads, and agents built on
# prometheus-client would otherwise choose by this header alone.
ACCEPT = "text/plain;version=0.0.4;q=1.0,*/*;q=0.1"
HEADERS = [(b"User-Agent", USER_AGENT.encode()), (b"Accept", ACCEPT.encode())]
GRACE_S = 0.5
"""How long past the deadline a round waits for jobs already running. Their network
operations all end by the deadline; what may be left is the parse of a body that
came just in time, or a DNS lookup (which no timeout interrupts)."""


class ScrapeError(RuntimeError):
    """One target's scrape failed; the message says why, in words that never quote the response."""


class _NotScraped(ScrapeError):
    """A worker took the job only after its deadline: the target was not tried."""


class _OverLimit(ScrapeError):
    """The answer broke one of the :class:`TargetLimits`."""


@dataclass(frozen=True)
class TargetLimits:
    """What one target may hold in the watchdog's memory (the settings ``target_*`` and ``max_series``)."""

    sample_limit: int = 50_000
    """Most gradwatch samples one scrape may hold (Prometheus's ``sample_limit``)."""
    series_limit: int = 100_000
    """Most series one target may hold: those it exports now plus those it stopped exporting
    that the store still keeps (up to an hour). Label churn hits this limit."""
    max_series: int = 1_000_000
    """Most series the store may hold over every target: the bound on the source's memory."""
    max_body_bytes: int = 64 * 1024 * 1024
    """A body this large is not an agent's exposition; refuse it rather than hold it in memory."""

    def __post_init__(self) -> None:
        for name in ("sample_limit", "series_limit", "max_series", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.series_limit < self.sample_limit:
            raise ValueError(f"series_limit ({self.series_limit}) must be >= sample_limit ({self.sample_limit})")


@dataclass(frozen=True)
class ScrapeResult:
    """What one round did: the service logs it and exports it as its own metrics."""

    ok: int
    failed: int
    samples: int
    duration_s: float
    errors: dict[TargetKey, str] = field(default_factory=dict)
    expired: list[Target] = field(default_factory=list)
    """Registrations removed this round for silence (see :meth:`TargetRegistry.expire`)."""
    skipped: int = 0
    """Due targets no worker reached before the deadline: tried first next round, not counted as failures."""


@dataclass(slots=True)
class _Job:
    """One target's scrape, started in the round at ``round_at`` (its samples' timestamp)."""

    target: Target
    round_at: float
    future: Future[ParsedSamples]
    background: bool
    """A stale target, or one whose last scrape ran into the deadline or a limit: the round does not wait for it."""
    recorded: bool = False
    """Its round already recorded it as failed; whatever it returns later is dropped."""


@dataclass
class _Tally:
    ok: int = 0
    samples: int = 0
    skipped: int = 0
    errors: dict[TargetKey, str] = field(default_factory=dict)


class ScrapeSource:
    """Fills ``store`` from the targets in ``registry``, one round per :meth:`scrape_all`.

    ``timeout_s`` is the deadline of every target's exchange in a round, counted
    from the round's start. Stale targets are retried every ``stale_retry_s``
    seconds instead of every round. ``max_in_flight`` workers scrape at once.

    A target whose last scrape ran into the deadline (a black hole, a trickle) or a
    limit (an oversized or churning exposition), or a stale one, is still scraped, with
    the same deadline, by workers of its own, but the round does not wait for it: its
    outcome is recorded when it ends, dated by the round it started in (its samples
    too), at the latest by the next round. So such a target costs the rounds its
    deadline once, not every round, and never takes a worker from the others. One
    round at a time: the service's loop calls it, not several threads.
    """

    def __init__(
        self,
        registry: TargetRegistry,
        store: SampleStore,
        timeout_s: float = 2.0,
        *,
        max_in_flight: int = 64,
        stale_retry_s: float = 30.0,
        limits: TargetLimits = TargetLimits(),
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.registry = registry
        self.store = store
        self.timeout_s = timeout_s
        self.stale_retry_s = stale_retry_s
        self.max_in_flight = max_in_flight
        self.limits = limits
        # No retries, no redirects (httpcore never follows them): one GET per target per round.
        self._http = httpcore.ConnectionPool(
            max_connections=2 * max_in_flight,
            max_keepalive_connections=max_in_flight,
            network_backend=DeadlineBackend(),
        )
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="gradwatch-scrape")
        self._costly_pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="gradwatch-scrape-costly")
        self._parsers: dict[TargetKey, ExpositionParser] = {}
        self._accepted: dict[TargetKey, object] = {}  # the series list of each target's last stored scrape
        self._busy: dict[TargetKey, _Job] = {}  # jobs still running after their round
        self._costly: set[TargetKey] = set()  # targets whose last scrape ran into the deadline or a limit
        self._last_tried: dict[TargetKey, float] = {}  # when a worker last took each target's job
        self.scrapes_total: dict[TargetKey, int] = {}
        """Scrape attempts per target since start (the service exports these as counters)."""
        self.scrape_failures_total: dict[TargetKey, int] = {}
        """Failed scrape attempts per target since start."""

    def should_scrape(self, target: Target, now: float) -> bool:
        """Every round for live targets; every ``stale_retry_s`` for stale ones."""
        if not target.stale or target.last_attempt is None:
            return True
        return now - target.last_attempt >= self.stale_retry_s

    def scrape_all(self, now: float) -> ScrapeResult:
        """Scrape every due target concurrently and store its samples at time ``now``; returns by the deadline."""
        started = time.monotonic()
        until = started + self.timeout_s
        expired = self.registry.expire(now)
        tally = _Tally()
        with self.registry.batch():  # the round's staleness flips reach the store in one transaction
            self._settle_ended(tally)
            jobs = self._submit(now, until)
            self._wait(jobs, until)
            for job in jobs:
                self._finish(job, tally)
        return ScrapeResult(
            ok=tally.ok,
            failed=len(tally.errors),
            samples=tally.samples,
            duration_s=time.monotonic() - started,
            errors=tally.errors,
            expired=expired,
            skipped=tally.skipped,
        )

    def _settle_ended(self, tally: _Tally) -> None:
        """Record the jobs of earlier rounds that ended since, dated by their own rounds."""
        for key, job in list(self._busy.items()):
            if job.future.done():
                del self._busy[key]
                if not job.recorded:
                    self._settle(job, tally)

    def _submit(self, now: float, until: float) -> list[_Job]:
        targets = self.registry.targets()
        self._forget_others(targets)
        due = [t for t in targets if t.key not in self._busy and self.should_scrape(t, now)]
        # Those that answered last time first; the others by turns, least recently tried first,
        # so however many dead targets there are, a live one is tried within a few rounds.
        tried = self._last_tried
        due.sort(key=lambda t: (_priority(t), tried.get(t.key, -math.inf)))
        # Slow and stale targets go to their own workers, never more than are free: the
        # others wait for a later round (they are then the least recently tried).
        free = self.max_in_flight - sum(1 for j in self._busy.values() if j.background and not j.future.done())
        jobs = []
        for target in due:
            background = target.stale or target.key in self._costly
            if background:
                if free <= 0:
                    continue
                free -= 1
            pool = self._costly_pool if background else self._pool
            future = pool.submit(self._fetch, target, self._parser_for(target), until)
            jobs.append(_Job(target, now, future, background))
        return jobs

    def _wait(self, jobs: list[_Job], until: float) -> None:
        """Wait for the round's other jobs until the deadline; those no worker took by then are cancelled."""
        waited = [j for j in jobs if not j.background]
        wait_all([j.future for j in waited], timeout=max(0.0, until - time.monotonic()))
        running = [j.future for j in waited if not j.future.cancel()]  # cancel() fails once a worker took it
        wait_all(running, timeout=max(0.0, until + GRACE_S - time.monotonic()))

    def _finish(self, job: _Job, tally: _Tally) -> None:
        key = job.target.key
        if job.future.cancelled():
            tally.skipped += 1  # never tried: neither an attempt nor a failure
            return
        if job.future.done():
            self._settle(job, tally)
            return
        self._busy[key] = job  # not scraped again until it ends
        if not job.background:  # the round waited its deadline for it: a failure now
            job.recorded = True
            self._record_failure(job, f"timed out after {self.timeout_s:g} s", tally, True)

    def in_flight(self) -> int:
        """Scrapes still running after their round (slow targets'); each ends by its round's deadline."""
        return sum(1 for job in self._busy.values() if not job.future.done())

    def close(self) -> None:
        """Stop the worker threads (each ends by its round's deadline) and close every connection."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._costly_pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()

    def _settle(self, job: _Job, tally: _Tally) -> None:
        """Store an ended job's samples at its round's time, or record why it failed."""
        error = job.future.exception()
        if isinstance(error, _NotScraped):
            tally.skipped += 1
            return
        if error is not None:
            costly = isinstance(error, (httpcore.TimeoutException, _OverLimit))
            self._record_failure(job, describe(error, self.timeout_s), tally, costly)
            return
        parsed = job.future.result()
        refused = self._over_limit(job.target, parsed)
        if refused is not None:
            self._record_failure(job, refused, tally, True)
            return
        key = job.target.key
        self.scrapes_total[key] = self.scrapes_total.get(key, 0) + 1
        self._last_tried[key] = job.round_at
        tally.samples += parsed.add_to(self.store, job.round_at)
        tally.ok += 1
        self._accepted[key] = parsed.series
        self._costly.discard(key)
        self.registry.mark_scraped(key, job.round_at, True, url=job.target.metrics_url)

    def _record_failure(self, job: _Job, message: str, tally: _Tally, costly: bool) -> None:
        """``costly``: it ran into the deadline or a limit, so later rounds will not wait for it."""
        key = job.target.key
        tally.errors[key] = message
        self.scrapes_total[key] = self.scrapes_total.get(key, 0) + 1
        self._last_tried[key] = job.round_at
        self.scrape_failures_total[key] = self.scrape_failures_total.get(key, 0) + 1
        if costly:
            self._costly.add(key)
        else:
            self._costly.discard(key)
        self.registry.mark_scraped(key, job.round_at, False, message, url=job.target.metrics_url)

    def _over_limit(self, target: Target, parsed: ParsedSamples) -> str | None:
        """Why storing ``parsed`` would break ``target``'s limits, or None. Reads the store: this thread only."""
        if parsed.series is self._accepted.get(target.key):
            return None  # the very series of its last stored scrape: nothing new to hold
        store, limits = self.store, self.limits
        new = sum(1 for name, labels in parsed.series if not store.has(name, labels))
        held = store.series_of(target.run, str(target.rank))
        if held + new > limits.series_limit:
            return (
                f"series limit: {new} new series would make {held + new}, over target_series_limit "
                f"({limits.series_limit}); labels that change every scrape (label churn) do this"
            )
        if store.series_count() + new > limits.max_series:
            return f"series limit: the watchdog holds {store.series_count()} series, max_series is {limits.max_series}"
        return None

    def _forget_others(self, targets: list[Target]) -> None:
        """Drop what is kept per target for targets no longer registered, so it is bounded by the registry."""
        if len(self._parsers) <= len(targets):
            return
        live = {t.key for t in targets}
        for kept in (self._parsers, self._accepted, self._last_tried, self.scrapes_total, self.scrape_failures_total):
            for key in [k for k in kept if k not in live]:
                del kept[key]
        self._costly &= live

    def _parser_for(self, target: Target) -> ExpositionParser:
        # One parser per target: it reuses its previous parse while the target's
        # exposition keeps its shape (see parse.py). Only that target's job uses it.
        parser = self._parsers.get(target.key)
        if parser is None:
            labels = {"run": target.run, "rank": str(target.rank)}  # the registration's, never the exposition's
            parser = self._parsers[target.key] = ExpositionParser(labels)
        return parser

    def _fetch(self, target: Target, parser: ExpositionParser, until: float) -> ParsedSamples:
        """Runs in a worker thread: one GET ending by ``until``, bounded in size, then parse within the limits."""
        if time.monotonic() >= until:
            raise _NotScraped("not scraped: no worker was free before the deadline")
        with deadline(until):
            body = self._get(target.metrics_url, until)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ScrapeError("the exposition is not UTF-8 text") from None
        limit = self.limits.sample_limit
        counted = count_samples(text)  # before the parser's ~25 µs a line is spent on an oversized body
        if counted > limit:
            raise _OverLimit(f"sample limit: {counted} samples, over target_sample_limit ({limit})")
        try:
            parsed = parser.parse(text)
        except Exception:  # the prometheus-client parser raises more than ValueError on bad input
            # Never its message: it quotes the offending line, i.e. the response.
            raise ScrapeError("unparseable exposition (not the Prometheus text format)") from None
        if len(parsed) > limit:
            raise _OverLimit(f"sample limit: {len(parsed)} samples, over target_sample_limit ({limit})")
        return parsed

    def _get(self, url: str, until: float) -> bytes:
        left = max(until - time.monotonic(), 0.001)
        timeouts = {"connect": left, "read": left, "write": left, "pool": left}
        limit = self.limits.max_body_bytes
        with self._http.stream("GET", url, headers=HEADERS, extensions={"timeout": timeouts}) as response:
            if response.status != 200:
                raise ScrapeError(f"HTTP {response.status}")
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_stream():
                size += len(chunk)
                if size > limit:
                    raise _OverLimit(f"response over {limit} bytes")
                chunks.append(chunk)
        return b"".join(chunks)


def _priority(target: Target) -> int:
    """Scrape order within a round: answered last time, then new or failing, then stale."""
    if target.stale:
        return 2
    return 0 if target.last_attempt is not None and target.last_error is None else 1


def describe(error: BaseException, timeout_s: float) -> str:
    """A one-line reason for a target's last_error and the logs: a fixed description, never response text."""
    if isinstance(error, ScrapeError):
        return str(error)
    if isinstance(error, httpcore.TimeoutException):
        return f"timed out after {timeout_s:g} s"
    cause = error.__cause__ if isinstance(error.__cause__, OSError) else None
    reason = f" ({cause.strerror})" if cause is not None and cause.strerror else ""
    if isinstance(error, httpcore.ConnectError):
        return f"cannot connect{reason}"
    if isinstance(error, (httpcore.ReadError, httpcore.WriteError)):
        return f"connection lost{reason}"
    if isinstance(error, httpcore.ProtocolError):
        return "not a valid HTTP/1.1 response"
    if isinstance(error, httpcore.UnsupportedProtocol):
        return "unsupported URL scheme"
    return f"scrape failed ({type(error).__name__})"
