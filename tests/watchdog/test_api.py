"""The HTTP API through FastAPI's TestClient, over a real service driven by a fake clock."""

from __future__ import annotations

import math

import pytest
from fastapi.testclient import TestClient

from gradwatch.watchdog.api import create_app
from gradwatch.watchdog.service import Service
from gradwatch.watchdog.settings import Settings
from tests.watchdog.fakes import T0, Clock

RULES = """
rules:
  - name: LossHigh
    kind: threshold
    metric: gradwatch_loss
    op: above
    value: 10
    labels: {severity: warning}
  - name: LossNonFinite
    kind: nonfinite
    counters: []
    gauges: [{metric: gradwatch_loss}]
"""


@pytest.fixture
def env(tmp_path, fake_agent):
    """(client, service, clock, agent, config path): a service on a real config file, with run r1 registered."""
    path = tmp_path / "gradwatch.yaml"
    path.write_text(RULES)
    clock = Clock()
    service = Service(Settings(db=str(tmp_path / "gw.db"), config=path, scrape_interval=2), clock=clock)
    client = TestClient(create_app(service), client=("127.0.0.1", 50000))
    response = client.post("/api/v1/runs", json={"run": "r1", "rank": 0, "metrics_url": fake_agent.url})
    assert response.status_code == 201, response.text
    yield client, service, clock, fake_agent, path
    client.close()
    service.close()


def test_register_returns_the_run_and_the_scrape_interval(env):
    client, *_ = env
    body = client.post("/api/v1/runs", json={"run": "r2", "rank": 1, "world_size": 2, "metrics_url": "http://127.0.0.1:1/metrics"}).json()
    assert body["scrape_interval_s"] == 2.0
    assert body["run"] | {"registered_at": None, "last_seen": None} == {
        "run": "r2", "rank": 1, "world_size": 2, "metrics_url": "http://127.0.0.1:1/metrics", "registered_at": None,
        "last_seen": None, "stale": False, "last_step": 0, "pid": None, "hostname": None, "last_error": None,
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"run": "has space", "rank": 0, "metrics_url": "http://127.0.0.1:1/metrics"}, "run"),
        ({"run": "r", "rank": -1, "metrics_url": "http://127.0.0.1:1/metrics"}, "rank"),
        ({"run": "r", "rank": 0, "metrics_url": "not a url"}, "metrics_url"),
        ({"run": "r", "rank": 0}, "metrics_url"),
        ({"run": "r", "rank": 0, "metrics_url": "http://127.0.0.1:1/metrics", "colour": "red"}, "colour"),
    ],
)
def test_a_bad_registration_is_422_naming_the_field(env, body, field):
    client, *_ = env
    response = client.post("/api/v1/runs", json=body)
    assert response.status_code == 422
    assert [e["loc"] for e in response.json()["detail"]] == [["body", field]]


def test_runs_are_listed_and_filtered(env):
    client, service, clock, agent, _ = env
    agent.step.set(7)
    service.tick()
    client.post("/api/v1/runs", json={"run": "r2", "rank": 0, "metrics_url": "http://127.0.0.1:9/metrics"})
    assert [(r["run"], r["last_step"]) for r in client.get("/api/v1/runs").json()] == [("r1", 7), ("r2", 0)]
    assert [r["run"] for r in client.get("/api/v1/runs", params={"run": "r2"}).json()] == ["r2"]


def test_alerts_current_and_history(env):
    client, service, clock, agent, _ = env
    agent.loss.set(50.0)
    service.tick()
    (alert,) = client.get("/api/v1/alerts").json()
    assert (alert["rule"], alert["state"], alert["value"], alert["fired_at"]) == ("LossHigh", "firing", "50.0", T0)
    assert alert["labels"] == {"alertname": "LossHigh", "run": "r1", "rank": "0", "severity": "warning"}
    assert client.get("/api/v1/alerts", params={"state": "pending"}).json() == []
    assert client.get("/api/v1/alerts", params={"run": "other"}).json() == []
    assert client.get("/api/v1/alerts", params={"state": "bogus"}).status_code == 422

    agent.loss.set(1.0)
    clock.t += 2
    service.tick()
    assert [a["state"] for a in client.get("/api/v1/alerts", params={"state": "resolved"}).json()] == ["resolved"]
    history = client.get("/api/v1/alerts/history", params={"run": "r1"}).json()
    assert [e["kind"] for e in history] == ["alert.resolved", "alert.firing"]  # for: 0 fires at once
    assert client.get("/api/v1/alerts/history", params={"limit": 1}).json()[0]["kind"] == "alert.resolved"


def test_non_finite_alert_values_are_valid_json(env):
    client, service, _, agent, _ = env
    agent.loss.set(math.nan)
    service.tick()
    (alert,) = client.get("/api/v1/alerts").json()
    assert (alert["rule"], alert["value"]) == ("LossNonFinite", "NaN")


def test_audit_filters(env):
    client, service, clock, agent, _ = env
    agent.loss.set(50.0)
    service.tick()
    kinds = [e["kind"] for e in client.get("/api/v1/audit").json()]
    assert kinds == ["alert.firing", "run.registered"]  # newest first
    assert [e["kind"] for e in client.get("/api/v1/audit", params={"kind": "run.registered"}).json()] == ["run.registered"]
    assert [e["kind"] for e in client.get("/api/v1/audit", params={"kind": "alert."}).json()] == kinds[:1]
    assert len(client.get("/api/v1/audit", params={"limit": 1}).json()) == 1
    assert client.get("/api/v1/audit", params={"since": T0 + 1}).json() == []
    assert client.get("/api/v1/audit", params={"run": "nobody"}).json() == []
    assert client.get("/api/v1/audit", params={"limit": 0}).status_code == 422


def test_reload_ok_and_bad(env):
    client, service, _, _, path = env
    assert client.post("/api/v1/rules/reload").json() == {"ok": True, "source": str(path), "rules": 2, "problems": []}
    path.write_text(RULES + "  - name: Broken\n    kind: spike\n")
    response = client.post("/api/v1/rules/reload")
    assert response.status_code == 400
    body = response.json()
    assert body["ok"] is False and body["rules"] == 2
    assert [(p["location"], p["line"]) for p in body["problems"]] == [("rules[2].metric", 13), ("rules[2].window", 13)]
    assert [r.name for r in service.engine.rules] == ["LossHigh", "LossNonFinite"]


def test_healthz_and_metrics(env):
    client, service, *_ = env
    assert client.get("/healthz").json()["status"] == "starting"
    service.tick()
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["rules"]["LossHigh"]["state"] == "ok"
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'gradwatch_watchdog_scrapes_total{rank="0",run="r1"} 1.0' in metrics.text
    assert "gradwatch_watchdog_evaluation_duration_seconds_count 1.0" in metrics.text


def test_healthz_is_503_when_the_loop_stalls(tmp_path):
    clock = Clock()
    service = Service(Settings(db=str(tmp_path / "gw.db"), scrape_interval=3600), clock=clock)
    client = TestClient(create_app(service), client=("127.0.0.1", 50000))
    try:
        service.start()  # one round now, the next in an hour of real time
        for _ in range(200):
            if service.snapshot().last_round is not None:
                break
            service._stop.wait(0.01)
        assert client.get("/healthz").status_code == 200
        clock.t += 5 * 3600  # no round for five intervals
        response = client.get("/healthz")
        assert response.status_code == 503 and response.json()["status"] == "stalled"
    finally:
        client.close()
        service.close()


def test_openapi_lists_every_path(env):
    client, *_ = env
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {
        "/api/v1/runs", "/api/v1/alerts", "/api/v1/alerts/history", "/api/v1/audit",
        "/api/v1/rules/reload", "/healthz", "/metrics",
        "/api/v1/runs/{run}", "/api/v1/runs/{run}/commands", "/api/v1/runs/{run}/acks", "/api/v1/commands",
        "/api/v1/alertmanager", "/api/v1/runs/{run}/pin", "/api/v1/incidents", "/api/v1/incidents/{incident_id}",
    }
    assert set(paths["/api/v1/runs"]) == {"get", "post"}
