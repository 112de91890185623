"""Hostile scrape targets against ``gradwatch serve`` as a real process, all on loopback.

1. A target sending its answer at 1 byte/s beside a healthy one: the healthy run
   keeps being scraped every round, ``/healthz`` stays ok, the slow one is cut off
   at the deadline, and SIGTERM still exits promptly.
2. A target registered as ``evil`` serving ``run="victim"`` series: every series,
   alert and audit entry it causes is ``evil``'s; ``victim`` gets nothing.
3. A registered URL that is another loopback service: ``GET /api/v1/runs`` shows why
   it failed, never what it answered.
"""

from __future__ import annotations

import contextlib
import signal

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.hostile import HostileTarget, serving, trickling
from tests.integration.watchdog_process import api, start_watchdog, wait_until

pytestmark = pytest.mark.integration

LOSS_RULE = """
rules:
  - name: LossHigh
    kind: threshold
    metric: gradwatch_loss
    op: above
    value: 10
"""


@pytest.fixture
def stack():
    with contextlib.ExitStack() as s:
        yield s


def _start(stack: contextlib.ExitStack, target: HostileTarget) -> HostileTarget:
    stack.callback(target.stop)
    return target


def _register(watchdog, run: str, url: str) -> None:
    response = httpx.post(f"{watchdog.url}/api/v1/runs", json={"run": run, "rank": 0, "metrics_url": url}, timeout=5)
    assert response.status_code == 201, response.text


def _scrapes(watchdog, run: str) -> float:
    """The watchdog's own count of scrapes of ``run`` (its /metrics)."""
    text = httpx.get(f"{watchdog.url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gradwatch_watchdog_scrapes_total" and sample.labels.get("run") == run:
                return sample.value
    return 0.0


def _last_error(watchdog, run: str) -> str | None:
    [entry] = api(watchdog, "/api/v1/runs", run=run)
    return entry["last_error"]


def test_a_target_trickling_at_one_byte_a_second_freezes_nothing(tmp_path, stack):
    watchdog = start_watchdog(tmp_path, "--db", str(tmp_path / "gw.db"))
    stack.callback(watchdog.stop)
    healthy = _start(stack, serving(b'gradwatch_step{run="healthy",rank="0"} 1\n'))
    slow = _start(stack, trickling(every_s=1.0))
    _register(watchdog, "healthy", healthy.url)
    wait_until("the healthy run's first scrape", lambda: _scrapes(watchdog, "healthy") >= 1)
    _register(watchdog, "slow", slow.url)

    wait_until("the slow target cut off at the deadline", lambda: _last_error(watchdog, "slow") == "timed out after 0.5 s")
    before = _scrapes(watchdog, "healthy")
    # Ten more rounds (0.5 s each): the slow target answers one byte a second throughout.
    wait_until("the healthy run scraped every round", lambda: _scrapes(watchdog, "healthy") >= before + 10, timeout=20)
    assert api(watchdog, "/healthz")["status"] == "ok"
    assert _last_error(watchdog, "healthy") is None

    watchdog.process.send_signal(signal.SIGTERM)
    assert watchdog.process.wait(10) == 0, "SIGTERM took longer than 10 s with a trickling target registered"


def test_a_target_cannot_write_or_alert_for_another_run(tmp_path, stack):
    config = tmp_path / "gradwatch.yaml"
    config.write_text(LOSS_RULE)
    watchdog = start_watchdog(tmp_path, "--config", str(config), "--db", str(tmp_path / "gw.db"))
    stack.callback(watchdog.stop)
    evil = _start(stack, serving(b'gradwatch_loss{run="victim",rank="0"} 50\ngradwatch_step{run="victim",rank="0"} 3\n'))
    _register(watchdog, "evil", evil.url)

    [alert] = wait_until("the loss alert", lambda: api(watchdog, "/api/v1/alerts", state="firing"))

    assert alert["labels"]["run"] == "evil"
    assert api(watchdog, "/api/v1/alerts", run="victim") == []
    assert api(watchdog, "/api/v1/alerts/history", run="victim") == []
    assert api(watchdog, "/api/v1/audit", run="victim") == []
    [run] = api(watchdog, "/api/v1/runs")
    assert run["run"] == "evil"


def test_runs_show_why_a_target_failed_never_what_it_answered(tmp_path, stack):
    watchdog = start_watchdog(tmp_path, "--db", str(tmp_path / "gw.db"))
    stack.callback(watchdog.stop)
    secret = b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
    other = _start(stack, serving(secret))
    _register(watchdog, "probe", other.url)

    error = wait_until("the failed scrape", lambda: _last_error(watchdog, "probe"))

    assert error == "unparseable exposition (not the Prometheus text format)"
    listing = httpx.get(f"{watchdog.url}/api/v1/runs", timeout=5).text + httpx.get(f"{watchdog.url}/api/v1/audit", timeout=5).text
    assert "root" not in listing and "nologin" not in listing
