"""The remediation endpoints through FastAPI's TestClient: authentication, poll, acks, operator, Alertmanager."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from gradwatch.watchdog.api import create_app
from gradwatch.watchdog.service import Service
from gradwatch.watchdog.settings import Settings
from gradwatch.watchdog.schema import AUTH_HEADER, SignedCommand, sign_request

SECRET = "api-secret"


def signed(method: str, path: str, body: bytes = b"", secret: str = SECRET) -> dict:
    return {AUTH_HEADER: sign_request(secret.encode(), method, path, body, time.time()), "Content-Type": "application/json"}


@pytest.fixture
def client(tmp_path):
    service = Service(Settings(db=str(tmp_path / "gw.db"), secret=SECRET, scrape_interval=2))
    with TestClient(create_app(service), client=("127.0.0.1", 50000)) as c:
        c.service = service
        yield c
    service.close()


def post(client, path, payload, secret=SECRET):
    body = json.dumps(payload).encode()
    return client.post(path, content=body, headers=signed("POST", path, body, secret))


def test_registration_must_be_signed_when_a_secret_is_set(client):
    reg = {"run": "r1", "rank": 0, "metrics_url": "http://127.0.0.1:1/metrics"}
    assert client.post("/api/v1/runs", json=reg).status_code == 401
    assert post(client, "/api/v1/runs", reg, secret="wrong").status_code == 401
    assert post(client, "/api/v1/runs", reg).status_code == 201
    kinds = [e["kind"] for e in client.get("/api/v1/audit").json()]
    assert kinds.count("auth.refused") == 2


def test_operator_command_is_polled_signed_and_acknowledged(client):
    assert post(client, "/api/v1/runs", {"run": "r1", "rank": 0, "metrics_url": "http://127.0.0.1:1/metrics"}).status_code == 201
    response = post(client, "/api/v1/runs/r1/commands", {"spec": {"action": "lower_lr", "factor": 0.25}, "reason": "me"})
    assert response.status_code == 201, response.text
    command_id = response.json()["id"]
    path = "/api/v1/runs/r1/commands?rank=0&after=0"
    assert client.get(path).status_code == 401  # agents sign their polls
    batch = client.get(path, headers=signed("GET", path)).json()
    command = SignedCommand.model_validate(batch["commands"][0])
    assert command.verify(SECRET.encode()) and command.command.spec.factor == 0.25
    ack = {"command_id": command_id, "run": "r1", "rank": 0, "status": "applied", "step": 17, "at": time.time(),
           "lr_scale": 0.25}
    assert post(client, "/api/v1/runs/r1/acks", [ack]).json() == {"recorded": 1}
    listed = client.get("/api/v1/commands?run=r1").json()[0]
    assert listed["ack"]["step"] == 17 and listed["delivered_at"] is not None
    kinds = [e["kind"] for e in client.get("/api/v1/audit?run=r1").json()]
    assert kinds == ["command.acked", "command.delivered", "command.decided", "run.registered"]


def test_invalid_operator_command_names_the_field(client):
    response = post(client, "/api/v1/runs/r1/commands", {"spec": {"action": "lower_lr", "factor": 3}})
    assert response.status_code == 422 and "factor" in response.text


def test_alertmanager_webhook_needs_the_bearer_secret(client):
    payload = {"version": "4", "status": "firing", "alerts": [
        {"status": "firing", "fingerprint": "f1", "startsAt": "2026-11-21T10:00:00Z",
         "labels": {"alertname": "GradNormSpike", "run": "r1", "gradwatch_action": "enable_clipping",
                    "gradwatch_mode": "global_norm", "gradwatch_threshold": "auto"}}]}
    assert client.post("/api/v1/alertmanager", json=payload).status_code == 401
    assert client.post("/api/v1/alertmanager", json=payload, headers={"Authorization": "Bearer nope"}).status_code == 401
    ok = client.post("/api/v1/alertmanager", json=payload, headers={"Authorization": f"Bearer {SECRET}"})
    assert ok.json()["outcomes"][0]["result"] == "issued"
    assert client.get("/api/v1/commands?run=r1").json()[0]["action"] == "enable_clipping"


def test_finished_run_is_forgotten(client):
    post(client, "/api/v1/runs", {"run": "r1", "rank": 0, "metrics_url": "http://127.0.0.1:1/metrics"})
    path = "/api/v1/runs/r1?rank=0"
    assert client.delete(path, headers=signed("DELETE", path)).json() == {"removed": True}
    assert client.get("/api/v1/runs").json() == []


def test_without_a_secret_the_watchdog_notifies_only(tmp_path):
    service = Service(Settings(db=str(tmp_path / "gw.db")))
    with TestClient(create_app(service), client=("127.0.0.1", 50000)) as c:
        assert c.post("/api/v1/runs/r1/commands", json={"spec": {"action": "lower_lr"}}).status_code == 403
        assert c.post("/api/v1/runs", json={"run": "r1", "rank": 0, "metrics_url": "http://127.0.0.1:1/metrics"}).status_code == 201
        assert c.get("/api/v1/runs/r1/commands?after=0").json()["commands"] == []
    service.close()
