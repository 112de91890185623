"""The embedded source: scrape every registered agent's ``/metrics`` directly.

The service calls :meth:`ScrapeSource.scrape_all` once per evaluation interval,
then evaluates the rules on the store. Every sample of a round is stored with
the round's single timestamp, so a rule comparing layers or runs sees aligned
points. A target that refuses, times out, answers garbage or answers slowly is
counted and reported, never lets the round fail.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import httpx

from ..samples import SampleStore
from .parse import ExpositionParser, ParsedSamples
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
MAX_BODY_BYTES = 64 * 1024 * 1024
"""A body this large is not an agent's exposition; refuse it rather than hold it in memory."""


class ScrapeError(RuntimeError):
    """One target's scrape failed; the message says why (HTTP status, timeout, parse error)."""


@dataclass(frozen=True)
class ScrapeResult:
    """What one round did: the service logs it and exports it as its own metrics."""

    ok: int
    failed: int
    samples: int
    duration_s: float
    errors: dict[TargetKey, str] = field(default_factory=dict)


class ScrapeSource:
    """Fills ``store`` from the targets in ``registry``, one round per :meth:`scrape_all`.

    ``timeout_s`` bounds each target's whole request (connect to last byte).
    Stale targets are retried every ``stale_retry_s`` seconds instead of every
    round, so a fleet of dead agents cannot slow the round down. ``client`` lets
    tests and the service share an ``httpx.Client`` (it must be thread-safe, as
    httpx's is); without one, the source owns its client and :meth:`close` closes it.
    One round at a time: the service's loop calls it, not several threads.
    """

    def __init__(
        self,
        registry: TargetRegistry,
        store: SampleStore,
        timeout_s: float = 2.0,
        client: httpx.Client | None = None,
        *,
        max_in_flight: int = 16,
        stale_retry_s: float = 30.0,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.registry = registry
        self.store = store
        self.timeout_s = timeout_s
        self.stale_retry_s = stale_retry_s
        self._owns_client = client is None
        self._client = client or httpx.Client(
            limits=httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight),
        )
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="gradwatch-scrape")
        self._parsers: dict[TargetKey, ExpositionParser] = {}
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
        """Scrape every due target concurrently and store its samples at time ``now``."""
        started = time.monotonic()
        due = [t for t in self.registry.targets() if self.should_scrape(t, now)]
        jobs: dict[Future[ParsedSamples], Target] = {
            self._pool.submit(self._fetch, target, self._parser_for(target.key)): target for target in due
        }
        # The store is not thread-safe: workers fetch and parse, this thread adds.
        wait_all(jobs)
        ok = samples = 0
        errors: dict[TargetKey, str] = {}
        for future, target in jobs.items():
            key = target.key
            self.scrapes_total[key] = self.scrapes_total.get(key, 0) + 1
            error = future.exception()
            if error is None:
                samples += future.result().add_to(self.store, now)
                ok += 1
                self.registry.mark_scraped(key, now, True, url=target.metrics_url)
            else:
                message = _describe(error)
                errors[key] = message
                self.scrape_failures_total[key] = self.scrape_failures_total.get(key, 0) + 1
                self.registry.mark_scraped(key, now, False, message, url=target.metrics_url)
        return ScrapeResult(
            ok=ok,
            failed=len(errors),
            samples=samples,
            duration_s=time.monotonic() - started,
            errors=errors,
        )

    def close(self) -> None:
        """Stop the worker threads; close the HTTP client if this source created it."""
        self._pool.shutdown(wait=True)
        if self._owns_client:
            self._client.close()

    def _parser_for(self, key: TargetKey) -> ExpositionParser:
        # One parser per target: it reuses its previous parse while the target's
        # exposition keeps its shape (see parse.py). Only that target's job uses it.
        parser = self._parsers.get(key)
        if parser is None:
            parser = self._parsers[key] = ExpositionParser()
        return parser

    def _fetch(self, target: Target, parser: ExpositionParser) -> ParsedSamples:
        """Runs in a worker thread: one GET, bounded in time and size, then parse."""
        body = self._get(target.metrics_url)
        try:
            return parser.parse(body.decode("utf-8"))
        except Exception as exc:  # the prometheus-client parser raises more than ValueError on bad input
            raise ScrapeError(f"unparseable exposition: {exc}") from exc

    def _get(self, url: str) -> bytes:
        # httpx's timeout bounds each connect/read, not the whole response; a
        # target trickling bytes is cut off by this deadline instead.
        deadline = time.monotonic() + self.timeout_s
        headers = {"User-Agent": USER_AGENT, "Accept": ACCEPT}
        with self._client.stream("GET", url, headers=headers, timeout=self.timeout_s) as response:
            if response.status_code != 200:
                raise ScrapeError(f"HTTP {response.status_code} from {url}")
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise ScrapeError(f"response from {url} exceeds {MAX_BODY_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise ScrapeError(f"timed out after {self.timeout_s:g} s reading {url}")
                chunks.append(chunk)
        return b"".join(chunks)


def _describe(error: BaseException) -> str:
    """A one-line reason for the target's last_error and the service's logs."""
    if isinstance(error, ScrapeError):
        return str(error)
    if isinstance(error, httpx.TimeoutException):
        return f"timed out ({type(error).__name__})"
    return f"{type(error).__name__}: {error}"

