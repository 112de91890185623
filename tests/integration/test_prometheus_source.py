"""PrometheusSource against the real Prometheus: the rules must get what a direct scrape gives them.

One prometheus-client endpoint per rank serves gradwatch series (a NaN and ±Inf gauge, a
counter with its ``_created`` sample); the real Prometheus scrapes it every
second; then both sources fill their own store and the stores must hold the same
series with the same values. The error and authentication cases at the end need
no Prometheus binary.
"""

from __future__ import annotations

import base64
import math
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from gradwatch.watchdog.samples import SampleStore
from gradwatch.watchdog.schema import Registration
from gradwatch.watchdog.sources.prometheus import PrometheusError, PrometheusSource
from gradwatch.watchdog.sources.scrape import USER_AGENT, ScrapeSource
from gradwatch.watchdog.sources.targets import TargetRegistry
from tests.integration.servers import free_port, start_prometheus

PROMETHEUS_CONFIG = """
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: trainer
    static_configs:
      - targets: ["{target}"]
"""


@pytest.fixture
def agent():
    """Two ranks of a training process, each with its own /metrics (values fixed for the test's duration)."""
    servers, endpoints = [], {}
    for rank in ("0", "1"):
        registry = CollectorRegistry()
        grad_norm = Gauge("gradwatch_grad_norm", "Gradient L2 norm.", ["run", "rank", "layer"], registry=registry)
        loss = Gauge("gradwatch_loss", "Loss.", ["run", "rank"], registry=registry)
        nonfinite = Counter(
            "gradwatch_nonfinite_grads", "Non-finite elements.", ["run", "rank", "layer", "kind"], registry=registry
        )
        grad_norm.labels("itest", rank, "embed.weight").set(0.125)
        grad_norm.labels("itest", rank, "head.weight").set(math.nan)
        grad_norm.labels("itest", rank, "block.0.mlp.weight").set(math.inf)
        loss.labels("itest", rank).set(-math.inf if rank == "1" else 2.5)
        nonfinite.labels("itest", rank, "head.weight", "nan").inc(7)
        server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
        servers.append((server, thread))
        endpoints[int(rank)] = f"127.0.0.1:{server.server_port}"
    yield endpoints
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def prometheus(tmp_path, agent):
    targets = '", "'.join(agent.values())
    server = start_prometheus(PROMETHEUS_CONFIG.format(target=targets), tmp_path)  # skips if the binary is missing
    try:
        yield server
    finally:
        server.stop()


def _snapshot(store: SampleStore, now: float) -> dict:
    """(name, labels) -> latest value; NaN made comparable."""
    out = {}
    names = ("gradwatch_grad_norm", "gradwatch_loss", "gradwatch_nonfinite_grads_total", "gradwatch_nonfinite_grads_created")
    for name in names:
        for series in store.select(name):
            _, value = series.latest(now)
            out[(name, series.labels)] = "NaN" if math.isnan(value) else value
    return out


def _wait_for_series(source: PrometheusSource, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    got = []
    while time.monotonic() < deadline:
        got = source.query(time.time())
        if len(got) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"Prometheus held {len(got)} gradwatch series, expected {count} within {timeout}s")


@pytest.mark.integration
def test_prometheus_and_direct_scrape_fill_the_store_identically(prometheus, agent):
    prom_store, scrape_store = SampleStore(), SampleStore()
    prom_source = PrometheusSource(prometheus.url, prom_store, timeout_s=5.0)
    registry = TargetRegistry()
    for rank, endpoint in agent.items():  # one endpoint per rank, as agents serve them
        registry.register(Registration(run="itest", rank=rank, metrics_url=f"http://{endpoint}/metrics"), time.time())
    scrape_source = ScrapeSource(registry, scrape_store, timeout_s=5.0)
    try:
        _wait_for_series(prom_source, count=10)  # 2 ranks x (3 grad norms + loss + counter)
        now = time.time()
        fetched = prom_source.fetch(now)
        scraped = scrape_source.scrape_all(now)
    finally:
        prom_source.close()
        scrape_source.close()

    assert fetched.samples == 10
    assert (scraped.ok, scraped.samples) == (2, 10)
    from_prometheus, direct = _snapshot(prom_store, now), _snapshot(scrape_store, now)
    assert from_prometheus == direct
    labels = (("layer", "head.weight"), ("rank", "0"), ("run", "itest"))
    assert from_prometheus[("gradwatch_grad_norm", labels)] == "NaN"
    assert from_prometheus[("gradwatch_nonfinite_grads_total", (("kind", "nan"), *labels))] == 7.0
    assert from_prometheus[("gradwatch_loss", (("rank", "1"), ("run", "itest")))] == -math.inf
    # Prometheus's job/instance labels are gone, as if scraped directly.
    for series in prom_store.select("gradwatch_grad_norm"):
        assert {k for k, _ in series.labels} == {"run", "rank", "layer"}


@pytest.mark.integration
def test_prometheus_error_is_reported_with_its_reason(prometheus):
    source = PrometheusSource(prometheus.url, SampleStore(), selector="{__name__=~")
    with pytest.raises(PrometheusError, match="HTTP 400, bad_data"):
        source.fetch(time.time())
    source.close()


def test_unreachable_prometheus_is_a_clear_error():
    source = PrometheusSource(f"http://127.0.0.1:{free_port()}", SampleStore(), timeout_s=1.0)
    with pytest.raises(PrometheusError, match="cannot query Prometheus"):
        source.fetch(1000.0)
    source.close()


def _mock_prometheus(seen: list[httpx.Request], status: int = 200, body: dict | None = None) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json=body or {"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {"__name__": "gradwatch_loss", "job": "trainer", "instance": "h:1", "run": "r", "rank": "0"},
             "value": [1000.0, "+Inf"]},
            {"metric": {"__name__": "gradwatch_step_created", "run": "r", "rank": "0"}, "value": [1000.0, "1.7e9"]},
        ]}})

    return httpx.Client(transport=httpx.MockTransport(handler))


def test_bearer_token_and_query_parameters_are_sent():
    seen: list[httpx.Request] = []
    store = SampleStore()
    with _mock_prometheus(seen) as client:
        source = PrometheusSource("https://prom.example/prometheus/", store, client=client, bearer_token="s3cret")
        assert source.fetch(1000.0).samples == 1

    request = seen[0]
    assert request.url.path == "/prometheus/api/v1/query"
    assert request.url.params["query"] == '{__name__=~"gradwatch_.*"}'
    assert float(request.url.params["time"]) == 1000.0
    assert request.headers["Authorization"] == "Bearer s3cret"
    assert request.headers["User-Agent"] == USER_AGENT
    [series] = store.select("gradwatch_loss")
    assert series.labels == (("rank", "0"), ("run", "r"))
    assert list(series.points) == [(1000.0, math.inf)]


def test_basic_auth_is_sent_and_a_refusal_names_auth():
    seen: list[httpx.Request] = []
    with _mock_prometheus(seen, status=401, body={"unauthorized": True}) as client:
        source = PrometheusSource("http://prom.example", SampleStore(), client=client, basic_auth=("grad", "watch"))
        with pytest.raises(PrometheusError, match="HTTP 401.*basic_auth"):
            source.fetch(1000.0)

    assert seen[0].headers["Authorization"] == "Basic " + base64.b64encode(b"grad:watch").decode()


def test_status_error_in_a_200_answer_is_an_error():
    with _mock_prometheus([], body={"status": "error", "errorType": "timeout", "error": "query timed out"}) as client:
        source = PrometheusSource("http://prom.example", SampleStore(), client=client)
        with pytest.raises(PrometheusError, match="timeout: query timed out"):
            source.fetch(1000.0)
