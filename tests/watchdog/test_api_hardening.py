"""Attacks on the watchdog's HTTP API, on loopback against the real service (uvicorn + Service + store).

Each test is one defect of the hardening pass (issue 13): open mode silencing a run,
replayed signatures, refused requests filling the audit log, unbounded bodies and
fields, an unauthenticated reload, unbounded command parameters.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time
import uuid

import pytest
from pydantic import ValidationError

from gradwatch.watchdog.schema import (
    AUTH_HEADER,
    EnableClipping,
    LowerLR,
    ReplayGuard,
    sign_request,
    verify_request,
)
from tests.watchdog.live import live_service

SECRET = "hardening-secret"
URL = "http://127.0.0.1:9/metrics"


def registration(run="r1", instance=None, url=URL, **extra) -> dict:
    return {"run": run, "rank": 0, "metrics_url": url, "instance": instance, **extra}


# -- 2: command parameters are bounded in the wire schema ----------------------------------------


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: EnableClipping(threshold=1e39), "threshold"),
        (lambda: EnableClipping(threshold=float("inf")), "threshold"),
        (lambda: EnableClipping(threshold=2e6), "threshold"),
        (lambda: EnableClipping(mode="adaptive", z=float("nan")), "z"),
        (lambda: EnableClipping(mode="adaptive", z=1e9), "z"),
        (lambda: LowerLR(factor=float("nan")), "factor"),
        (lambda: LowerLR(factor=1e-9), "factor"),
        (lambda: LowerLR(factor=0.5, min_lr=float("nan")), "min_lr"),
        (lambda: LowerLR(factor=0.5, min_lr=float("inf")), "min_lr"),
    ],
)
def test_unsafe_command_parameters_are_refused_by_the_schema(make, field):
    with pytest.raises(ValidationError, match=field):
        make()


def test_safe_parameters_still_pass():
    assert EnableClipping(threshold=1e6).threshold == 1e6 and EnableClipping(threshold="auto").threshold == "auto"
    assert LowerLR(factor=0.01, min_lr=0.0).factor == 0.01


def test_cli_refuses_an_overflowing_threshold_with_the_reason(monkeypatch, capsys):
    from gradwatch.watchdog.cli import main

    monkeypatch.setenv("GRADWATCH_SECRET", SECRET)
    monkeypatch.setenv("GRADWATCH_URL", "http://127.0.0.1:9")  # never reached
    assert main(["command", "r1", "enable-clipping", "--threshold", "1e39"]) == 2
    err = capsys.readouterr().err
    assert "threshold" in err and "1e+06" in err and "cannot reach" not in err


def test_rules_check_refuses_an_overflowing_threshold(tmp_path, capsys):
    from gradwatch.watchdog.cli import main

    path = tmp_path / "rules.yaml"
    path.write_text(
        "rules:\n  - name: Spike\n    kind: threshold\n    metric: gradwatch_grad_norm\n    op: above\n    value: 10\n"
        "    on_fire:\n      - {action: enable_clipping, mode: global_norm, threshold: 1e39}\n"
    )
    assert main(["rules", "check", str(path)]) != 0
    captured = capsys.readouterr()
    assert "threshold" in captured.err + captured.out


def test_alertmanager_labels_with_an_overflowing_threshold_queue_nothing(tmp_path):
    with live_service(tmp_path, secret=SECRET) as live:
        payload = {"version": "4", "status": "firing", "alerts": [{
            "status": "firing", "fingerprint": "f1", "startsAt": "2026-11-21T10:00:00Z",
            "labels": {"alertname": "Spike", "run": "r1", "gradwatch_action": "enable_clipping",
                       "gradwatch_threshold": "1e39"}}]}
        response = live.http.post("/api/v1/alertmanager", json=payload, headers={"Authorization": f"Bearer {SECRET}"})
        outcome = response.json()["outcomes"][0]
        assert outcome["result"] == "refused" and "threshold" in outcome["reason"]
        assert live.http.get("/api/v1/commands").json() == []


# -- 4: open mode cannot silence a run -------------------------------------------------------------


def test_open_mode_a_live_run_cannot_be_taken_from_its_agent(tmp_path):
    own, other = uuid.uuid4().hex, uuid.uuid4().hex
    with live_service(tmp_path) as live:
        assert live.http.post("/api/v1/runs", json=registration(instance=own)).status_code == 201
        # Another client re-registers the run elsewhere, with another instance or none: refused.
        for attacker in (other, None):
            response = live.http.post("/api/v1/runs", json=registration(instance=attacker, url="http://127.0.0.1:8/metrics"))
            assert response.status_code == 409 and "another live agent" in response.json()["detail"]
        # Deregistration without the registration's own instance: refused.
        assert live.http.delete("/api/v1/runs/r1", params={"rank": 0}).status_code == 403
        assert live.http.delete("/api/v1/runs/r1", params={"rank": 0, "instance": other}).status_code == 403
        [run] = live.http.get("/api/v1/runs").json()
        assert run["metrics_url"] == URL and "instance" not in run  # the id is never shown to others
        assert live.service.registry.get(("r1", 0)).metrics_url == URL  # still scraped where its agent is
        # Its own agent re-registers and deregisters freely.
        assert live.http.post("/api/v1/runs", json=registration(instance=own)).status_code == 201
        response = live.http.delete("/api/v1/runs/r1", params={"rank": 0, "instance": own})
        assert response.json() == {"removed": True}
        kinds = [e["kind"] for e in live.http.get("/api/v1/audit").json()]
        assert "run.refused" in kinds


def test_a_stale_registration_can_be_taken_over_by_a_restarted_agent(tmp_path):
    with live_service(tmp_path, stale_after=0.5) as live:
        assert live.http.post("/api/v1/runs", json=registration(instance=uuid.uuid4().hex)).status_code == 201
        time.sleep(0.6)  # nothing answers at URL: the run is silent for longer than stale_after
        assert live.http.post("/api/v1/runs", json=registration(instance=uuid.uuid4().hex)).status_code == 201


def test_a_poll_for_an_unregistered_run_is_404(tmp_path):
    with live_service(tmp_path) as live:
        response = live.http.get("/api/v1/runs/ghost/commands", params={"rank": 0})
        assert response.status_code == 404 and response.json() == {"detail": "run not registered"}
        live.http.post("/api/v1/runs", json=registration(run="ghost"))
        assert live.http.get("/api/v1/runs/ghost/commands", params={"rank": 0}).status_code == 200
        assert live.http.get("/api/v1/runs/ghost/commands", params={"rank": 1}).status_code == 404


def test_secret_mode_replacement_needs_a_signature_and_deregistration_the_secret(tmp_path):
    with live_service(tmp_path, secret=SECRET) as live:
        assert live.signed("POST", "/api/v1/runs", registration(instance=uuid.uuid4().hex)).status_code == 201
        assert live.signed("POST", "/api/v1/runs", registration(instance=uuid.uuid4().hex)).status_code == 201
        assert live.http.delete("/api/v1/runs/r1?rank=0").status_code == 401
        assert live.signed("DELETE", "/api/v1/runs/r1?rank=0").json() == {"removed": True}


def test_metrics_url_must_be_the_registering_clients_own_address(tmp_path):
    with live_service(tmp_path) as live:
        response = live.http.post("/api/v1/runs", json=registration(url="http://10.9.8.7:9100/metrics"))
        assert response.status_code == 403 and "registration_hosts" in response.json()["detail"]
        # An agent bound to 0.0.0.0 registers that: the watchdog scrapes the address it came from.
        response = live.http.post("/api/v1/runs", json=registration(run="any", url="http://0.0.0.0:9100/metrics"))
        assert response.status_code == 201
        assert response.json()["run"]["metrics_url"] == "http://127.0.0.1:9100/metrics"
        assert live.service.registry.get(("any", 0)).metrics_url == "http://127.0.0.1:9100/metrics"
        assert live.http.post("/api/v1/runs", json=registration(run="name", url="http://localhost:9/metrics")).status_code == 201
    (tmp_path / "allow").mkdir()
    with live_service(tmp_path / "allow", registration_hosts=["10.0.0.0/8"]) as live:
        assert live.http.post("/api/v1/runs", json=registration(url="http://10.9.8.7:9100/metrics")).status_code == 201


# -- 8: a signed request is accepted once ----------------------------------------------------------


def test_a_captured_signed_command_cannot_be_replayed(tmp_path):
    with live_service(tmp_path, secret=SECRET) as live:
        path = "/api/v1/runs/r1/commands"
        body = json.dumps({"spec": {"action": "lower_lr", "factor": 0.5}, "reason": "operator"}).encode()
        headers = {AUTH_HEADER: live.sign("POST", path, body), "Content-Type": "application/json"}
        codes = [live.http.post(path, content=body, headers=headers).status_code for _ in range(3)]
        assert codes == [201, 401, 401]
        assert len(live.http.get("/api/v1/commands").json()) == 1
        refused = live.http.get("/api/v1/audit", params={"kind": "auth.refused"}).json()
        assert refused and "replayed" in refused[0]["details"]["reason"]


def test_replay_guard_stays_bounded_and_never_lets_a_replay_through():
    secret, guard, now = b"s", ReplayGuard(capacity=3), 1000.0
    headers = [sign_request(secret, "GET", "/p", b"", now + i) for i in range(5)]
    assert [verify_request(secret, h, "GET", "/p", b"", now + 5, guard) for h in headers] == [None] * 5
    assert len(guard) == 3
    for h in headers:  # the remembered ones are replays, the forgotten ones too old to check: all refused
        assert verify_request(secret, h, "GET", "/p", b"", now + 5, guard) is not None
    old_format = f"{now:.3f}." + "0" * 64
    assert "malformed" in verify_request(secret, old_format, "GET", "/p", b"", now, guard)


# -- 10: refused requests are counted, not written one row each ------------------------------------


def test_a_flood_of_refused_requests_adds_a_bounded_number_of_audit_rows(tmp_path, caplog):
    with live_service(tmp_path, secret=SECRET) as live:
        store = live.service.store
        before = store.audit_size()
        with caplog.at_level(logging.WARNING, logger="gradwatch.watchdog"):
            for i in range(300):
                live.http.post("/api/v1/runs", json=registration(), headers={AUTH_HEADER: f"{time.time():.3f}.{'ab' * 16}.{i:064x}"})
        assert store.audit_size() - before == 1  # the first, with its details; the rest only counted
        assert sum("refused auth.refused" in r.getMessage() for r in caplog.records) == 1
    rows = store_rows(tmp_path / "gw.db", "auth.refused")
    assert sum(r["count"] for r in rows) == 300 and len(rows) == 2  # the window's count, written at close


def store_rows(path, kind):
    from gradwatch.watchdog.store import Store

    with Store(path) as s:
        return [e.details for e in s.audit(kind=kind, limit=1000)]


def test_the_audit_log_has_a_retention_bound(tmp_path):
    import sqlite3

    from gradwatch.watchdog.store import Store

    with Store(tmp_path / "a.db", audit_max_rows=1000, audit_max_age_s=3600) as s:
        s.append_audit_many([dict(kind="auth.refused", time=float(i)) for i in range(5000)])
        assert 1000 <= s.audit_size() <= 2000
        assert s.audit(limit=1)[0].time >= 3000  # the oldest went, the newest stayed
        s.append_audit_many([dict(kind="x.y", time=100_000.0 + i) for i in range(1000)])
        s.prune_audit()
        assert {e.kind for e in s.audit(limit=10_000)} == {"x.y"}  # older than an hour before the newest
    conn = sqlite3.connect(tmp_path / "a.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM audit")  # nothing but the retention bound deletes
    conn.close()


def test_a_store_that_cannot_be_written_makes_healthz_unhealthy_logged_once(tmp_path, caplog):
    with live_service(tmp_path) as live:
        assert live.http.get("/healthz").status_code == 200
        store = live.service.store
        pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
        store._conn.execute(f"PRAGMA max_page_count = {pages}")  # what a full disk answers: SQLITE_FULL
        with caplog.at_level(logging.ERROR, logger="gradwatch.watchdog.store"):
            for i in range(50):  # registrations and their audit rows need new pages
                live.http.post("/api/v1/runs", json=registration(run=f"r{i}", hostname="h" * 250))
        response = live.http.get("/healthz")
        assert response.status_code == 503
        health = response.json()
        assert health["status"] == "unhealthy" and "full" in health["store"]["error"]
        assert sum("cannot be written" in r.getMessage() for r in caplog.records) == 1


# -- 11: bounded bodies and fields, 4xx never 500 ---------------------------------------------------


def raw_request(url: str, head: bytes, body_chunks, limit_bytes: int) -> tuple[bytes, int]:
    """Send ``head``, then body chunks until the server answers or ``limit_bytes`` are sent; (answer, bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    sent, answer = 0, b""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        for chunk in body_chunks:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable or sent >= limit_bytes:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        try:
            answer = sock.recv(65536)
        except ConnectionResetError:
            pass
    return answer, sent


FIFTY_MB = 50 * 2**20


@pytest.mark.parametrize("mode", ["open", "secret"])
def test_a_50_mb_body_is_refused_413_without_being_read(tmp_path, mode):
    settings = {"secret": SECRET} if mode == "secret" else {}
    with live_service(tmp_path, **settings) as live:
        head = (f"POST /api/v1/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {FIFTY_MB}\r\n\r\n").encode()
        for _ in range(3):
            answer, sent = raw_request(live.url, head, (b"x" * 65536 for _ in range(800)), FIFTY_MB)
            assert answer.startswith(b"HTTP/1.1 413") and sent < FIFTY_MB  # before the 401 in secret mode
        # Without Content-Length (chunked), it is counted as it streams and cut at the limit.
        head = b"POST /api/v1/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunk = b"10000\r\n" + b"x" * 65536 + b"\r\n"
        answer, sent = raw_request(live.url, head, (chunk for _ in range(800)), FIFTY_MB)
        assert answer.startswith(b"HTTP/1.1 413") and sent < 8 * 2**20
        assert live.http.get("/api/v1/runs").json() == []
        assert [e["kind"] for e in live.http.get("/api/v1/audit").json()].count("request.refused") == 2  # one per reason (declared, streamed), not per request


@pytest.mark.parametrize(
    "body",
    [
        registration(pid=2**70),
        registration(step=2**70),
        registration(rank=2**40),
        registration(hostname="h" * 10_000),
        registration(url="http://127.0.0.1:9/" + "m" * 5000),
    ],
)
def test_out_of_range_fields_are_422(tmp_path, body):
    with live_service(tmp_path) as live:
        assert live.http.post("/api/v1/runs", json=body).status_code == 422
        assert live.http.get("/api/v1/runs").json() == []


def test_nan_step_and_malformed_alertmanager_payloads_are_422(tmp_path):
    with live_service(tmp_path, secret=SECRET) as live:
        nan = b'{"run": "r1", "rank": 0, "metrics_url": "http://127.0.0.1:9/metrics", "step": NaN}'
        assert live.http.post("/api/v1/runs", content=nan, headers={
            AUTH_HEADER: live.sign("POST", "/api/v1/runs", nan), "Content-Type": "application/json"}).status_code == 422
        bearer = {"Authorization": f"Bearer {SECRET}"}
        for payload in ({"alerts": "x"}, {"alerts": [1]}, {"alerts": [{"status": "firing", "labels": []}]},
                        {"alerts": [{"status": "firing", "labels": {"run": 3}}]}, [], "x"):
            response = live.http.post("/api/v1/alertmanager", json=payload, headers=bearer)
            assert response.status_code == 422, (payload, response.text)
        ack = [{"command_id": "c" * 16, "run": "r1", "rank": 0, "status": "applied", "step": 2**70, "at": 1.0}]
        assert live.signed("POST", "/api/v1/runs/r1/acks", ack).status_code == 422


# -- 15: reload needs the secret when one is set ----------------------------------------------------


def test_reload_needs_a_signature_when_a_secret_is_set(tmp_path):
    with live_service(tmp_path, secret=SECRET) as live:
        assert live.http.post("/api/v1/rules/reload").status_code == 401
        assert live.signed("POST", "/api/v1/rules/reload").status_code == 200
    (tmp_path / "open").mkdir()
    with live_service(tmp_path / "open") as live:
        assert live.http.post("/api/v1/rules/reload").status_code == 200
