"""The production source: read gradwatch series from a Prometheus server's HTTP API.

Used instead of direct scraping when Prometheus (or Thanos/Mimir behind the same
API) already scrapes the agents. The service calls :meth:`PrometheusSource.fetch`
once per evaluation interval; it runs one instant query and adds the result to
the store exactly as the scrape source would: same names, same label sets
(``job``/``instance`` dropped, no ``_created`` series), same float values, one
timestamp per round. The rule engine cannot tell the two sources apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from ..samples import SampleStore
from .parse import ParsedSamples, SeriesKey, build_sample_labels, should_keep
from .scrape import USER_AGENT

DEFAULT_SELECTOR = '{__name__=~"gradwatch_.*"}'


class PrometheusError(RuntimeError):
    """The query failed: Prometheus unreachable, refused (HTTP/auth), or answered ``status: error``."""


@dataclass(frozen=True)
class FetchResult:
    """What one query did: the service logs it and exports it as its own metrics."""

    samples: int
    duration_s: float
    warnings: tuple[str, ...] = ()


class PrometheusSource:
    """Fills ``store`` with the latest value of every series matching ``selector``.

    ``url`` is Prometheus's base URL, including any route prefix
    (``http://prometheus:9090`` or ``https://host/prometheus``). Give at most one
    of ``bearer_token`` and ``basic_auth=(user, password)`` when Prometheus sits
    behind an authenticating proxy. ``client`` lets tests and the service share
    an ``httpx.Client``; without one, the source owns its client and
    :meth:`close` closes it.
    """

    def __init__(
        self,
        url: str,
        store: SampleStore,
        timeout_s: float = 10.0,
        selector: str = DEFAULT_SELECTOR,
        client: httpx.Client | None = None,
        *,
        bearer_token: str | None = None,
        basic_auth: tuple[str, str] | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        if bearer_token is not None and basic_auth is not None:
            raise ValueError("give bearer_token or basic_auth, not both")
        self.url = url.rstrip("/")
        self.store = store
        self.timeout_s = timeout_s
        self.selector = selector
        self._headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if bearer_token is not None:
            self._headers["Authorization"] = f"Bearer {bearer_token}"
        self._auth = httpx.BasicAuth(*basic_auth) if basic_auth is not None else None
        self._owns_client = client is None
        self._client = client or httpx.Client()

    def fetch(self, now: float) -> FetchResult:
        """Query at time ``now`` and add every gradwatch sample to the store at ``now``. Raises PrometheusError."""
        started = time.monotonic()
        samples, warnings = self._query(now)
        count = samples.add_to(self.store, now)
        return FetchResult(samples=count, duration_s=time.monotonic() - started, warnings=warnings)

    def query(self, now: float) -> ParsedSamples:
        """The samples :meth:`fetch` would store, without storing them. Raises PrometheusError."""
        return self._query(now)[0]

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def _query(self, now: float) -> tuple[ParsedSamples, tuple[str, ...]]:
        endpoint = f"{self.url}/api/v1/query"
        params = {"query": self.selector, "time": f"{now:.3f}"}
        try:
            response = self._client.get(
                endpoint, params=params, headers=self._headers, auth=self._auth, timeout=self.timeout_s
            )
        except httpx.HTTPError as exc:
            raise PrometheusError(f"cannot query Prometheus at {endpoint}: {type(exc).__name__}: {exc}") from exc
        body = _json_or_none(response)
        if response.status_code != 200 or body is None or body.get("status") != "success":
            raise PrometheusError(_describe_failure(endpoint, response, body))
        data = body.get("data") or {}
        if data.get("resultType") != "vector":
            raise PrometheusError(
                f"selector {self.selector!r} gave a {data.get('resultType')!r} result, not an instant vector"
            )
        keys: list[SeriesKey] = []
        values: list[float] = []
        try:
            for series in data.get("result") or ():
                metric = dict(series["metric"])
                # Skip series without a name (a selector wrapped in a function),
                # outside the contract, or prometheus-client's `_created` series
                # (Prometheus stores them as series of their own): the scrape
                # source never stores those either.
                name = metric.pop("__name__", "")
                if not should_keep(name):
                    continue
                # Values are strings; float() reads Prometheus's "NaN", "+Inf" and "-Inf".
                values.append(float(series["value"][1]))
                keys.append((name, build_sample_labels(metric)))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise PrometheusError(f"malformed series in the answer of Prometheus at {endpoint}: {exc!r}") from exc
        return ParsedSamples(keys, values), tuple(body.get("warnings") or ())


def _json_or_none(response: httpx.Response) -> dict | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _describe_failure(endpoint: str, response: httpx.Response, body: dict | None) -> str:
    """One line naming what went wrong, with Prometheus's own error when it sent one."""
    where = f"Prometheus at {endpoint}"
    if body is not None and body.get("status") == "error":
        reason = f"{body.get('errorType', 'error')}: {body.get('error', '')}"
        return f"{where} answered HTTP {response.status_code}, {reason}"
    if response.status_code in (401, 403):
        return f"{where} refused the query (HTTP {response.status_code}): check bearer_token/basic_auth"
    if response.status_code != 200:
        return f"{where} answered HTTP {response.status_code}: {response.text[:200]!r}"
    return f"{where} answered something that is not a Prometheus API response: {response.text[:200]!r}"
