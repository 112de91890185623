"""ScrapeSource against real prometheus-client endpoints on 127.0.0.1, a dead one and a silent one."""

from __future__ import annotations

import math
import socket

import pytest
from gradwatch.watchdog.samples import SampleStore
from gradwatch.watchdog.schema import Registration
from gradwatch.watchdog.sources.scrape import USER_AGENT, ScrapeSource
from gradwatch.watchdog.sources.targets import TargetRegistry
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
    start_http_server,
)

from tests.hostile import serving
from tests.integration.servers import free_port
from tests.integration.watchdog_process import wait_until

GOOD = ("good", 0)
DEAD = ("dead", 0)
SILENT = ("silent", 0)


class Agent:
    """A prometheus-client /metrics endpoint with a few gradwatch series, like a training process's."""

    def __init__(self, run: str = "good", rank: str = "0") -> None:
        self.registry = CollectorRegistry()
        self.grad_norm = Gauge("gradwatch_grad_norm", "", ["run", "rank", "layer"], registry=self.registry)
        self.skipped = Counter("gradwatch_skipped_steps", "", ["run", "rank", "reason"], registry=self.registry)
        self.grad_norm.labels(run, rank, "fc1.weight").set(0.5)
        self.grad_norm.labels(run, rank, "fc2.weight").set(math.nan)
        self.skipped.labels(run, rank, "nonfinite").inc(2)
        self.server, self.thread = start_http_server(0, addr="127.0.0.1", registry=self.registry)
        self.url = f"http://127.0.0.1:{self.server.server_port}/metrics"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def agent():
    a = Agent()
    yield a
    a.stop()


@pytest.fixture
def silent_url():
    """Accepts connections (the kernel's backlog) but never answers: a hung process."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}/metrics"


def _register(registry: TargetRegistry, key, url: str, now: float) -> None:
    registry.register(Registration(run=key[0], rank=key[1], metrics_url=url), now)


@pytest.fixture
def setup(agent, silent_url):
    registry = TargetRegistry(stale_after_s=10.0)
    store = SampleStore()
    _register(registry, GOOD, agent.url, 1000.0)
    _register(registry, DEAD, f"http://127.0.0.1:{free_port()}/metrics", 1000.0)
    _register(registry, SILENT, silent_url, 1000.0)
    source = ScrapeSource(registry, store, timeout_s=0.5, stale_retry_s=30.0)
    yield registry, store, source
    source.close()


def _value(store: SampleStore, name: str, **labels: str) -> list[tuple[float, float]]:
    [series] = list(store.select(name, labels))
    return list(series.points)


def test_round_survives_dead_and_silent_targets(setup):
    registry, store, source = setup

    result = source.scrape_all(now=1000.0)

    assert (result.ok, result.failed) == (1, 2)
    assert result.samples == 3
    assert set(result.errors) == {DEAD, SILENT}
    assert "timed out" in result.errors[SILENT]
    assert _value(store, "gradwatch_grad_norm", run="good", layer="fc1.weight") == [(1000.0, 0.5)]
    [(t, nan)] = _value(store, "gradwatch_grad_norm", run="good", layer="fc2.weight")
    assert t == 1000.0 and math.isnan(nan)
    assert _value(store, "gradwatch_skipped_steps_total", run="good", reason="nonfinite") == [(1000.0, 2.0)]
    assert store.series_count() == 3  # no _created, no process_* / python_* series
    assert source.scrapes_total == {GOOD: 1, DEAD: 1, SILENT: 1}
    assert source.scrape_failures_total == {DEAD: 1, SILENT: 1}
    assert registry.get(DEAD).last_error == result.errors[DEAD]


def test_failing_targets_go_stale_and_are_retried_only_every_stale_retry(setup):
    registry, store, source = setup

    source.scrape_all(now=1005.0)
    assert not registry.get(DEAD).stale  # silent 5 s of the 10 allowed
    source.scrape_all(now=1010.0)
    assert registry.get(DEAD).stale
    assert not registry.get(GOOD).stale
    # SILENT ran into the deadline at 1005, so the 1010 round did not wait for it: its
    # outcome is recorded by the next round, dated by its own.
    assert not registry.get(SILENT).stale
    wait_until("SILENT's scrape to end", lambda: source.in_flight() == 0)

    source.scrape_all(now=1015.0)  # stale ones are not due: only the good one is scraped
    assert registry.get(SILENT).stale and registry.get(SILENT).last_attempt == 1010.0
    assert source.scrapes_total == {GOOD: 3, DEAD: 2, SILENT: 2}
    source.scrape_all(now=1040.0)  # 30 s after their last attempt: retried (stale: not waited for)
    wait_until("the stale targets' retries to end", lambda: source.in_flight() == 0)
    source.scrape_all(now=1041.0)
    assert source.scrapes_total == {GOOD: 5, DEAD: 3, SILENT: 3}
    assert source.scrape_failures_total == {DEAD: 3, SILENT: 3}
    assert registry.get(DEAD).last_attempt == 1040.0
    assert registry.get(SILENT).last_attempt == 1040.0
    times = [t for t, _ in _value(store, "gradwatch_grad_norm", run="good", layer="fc1.weight")]
    assert times == [1005.0, 1010.0, 1015.0, 1040.0, 1041.0]


def test_restarted_agent_reregisters_and_its_history_continues(setup):
    registry, store, source = setup
    source.scrape_all(now=1000.0)

    # The "dead" run comes up on a new port (an agent restart) and registers again.
    restarted = Agent(run="dead")
    try:
        restarted.grad_norm.labels("dead", "0", "fc1.weight").set(7.0)
        _register(registry, DEAD, restarted.url, 1012.0)
        assert not registry.get(DEAD).stale
        source.scrape_all(now=1015.0)
        restarted.grad_norm.labels("dead", "0", "fc1.weight").set(8.0)
        source.scrape_all(now=1020.0)
    finally:
        restarted.stop()

    assert registry.get(DEAD).last_success == 1020.0
    assert source.scrape_failures_total[DEAD] == 1
    assert _value(store, "gradwatch_grad_norm", run="dead", layer="fc1.weight") == [(1015.0, 7.0), (1020.0, 8.0)]
    # The good agent's series kept one window across all rounds.
    assert len(_value(store, "gradwatch_grad_norm", run="good", layer="fc1.weight")) == 3


def test_sends_user_agent_and_asks_for_the_text_format():
    registry_ = CollectorRegistry()
    Gauge("gradwatch_step", "", ["run", "rank"], registry=registry_).labels("r", "0").set(3)
    targets = TargetRegistry()
    with serving(generate_latest(registry_)) as agent:
        targets.register(Registration(run="r", rank=0, metrics_url=agent.url), 0.0)
        source = ScrapeSource(targets, SampleStore(), timeout_s=1.0)
        assert source.scrape_all(now=1.0).ok == 1
        source.close()
        request = agent.last_request.decode()

    assert f"\r\nUser-Agent: {USER_AGENT}\r\n" in request
    assert USER_AGENT.startswith("gradwatch-watchdog/")
    assert "\r\nAccept: text/plain" in request


def test_http_error_and_garbage_count_as_failures():
    targets = TargetRegistry()
    with serving(b"overloaded", status="503 Service Unavailable") as broken, serving(b"gradwatch_step{run= 1 2 3\n") as garbage:
        targets.register(Registration(run="a", rank=0, metrics_url=broken.url), 0.0)
        targets.register(Registration(run="b", rank=0, metrics_url=garbage.url), 0.0)
        source = ScrapeSource(targets, SampleStore(), timeout_s=1.0)
        result = source.scrape_all(now=1.0)
        source.close()

    assert (result.ok, result.failed) == (0, 2)
    assert "HTTP 503" in result.errors[("a", 0)]
    assert "unparseable" in result.errors[("b", 0)]
