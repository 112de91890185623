"""The watchdog's store under faults: ``kill -9`` under write load, and a flood of refused requests.

kill -9: ``gradwatch serve`` (secret mode) watches runs whose loss is over a rule's
threshold, so every run has a firing alert delivered to a webhook; writer threads
issue operator commands as fast as the API takes them. The process is SIGKILLed
mid-load and restarted on the same store. Every command the API acknowledged (201)
must be there after the restart, and no alert is notified twice.

Refused flood: 1,000 requests with bad signatures from one client. Audit rows and
their bytes are counted in the store (read-only, beside the running service).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from gradwatch.demo.services import HOST, NotificationSink, WatchdogProcess
from gradwatch.watchdog.schema import AUTH_HEADER, sign_request

RULES = """
rules:
  - name: LossHigh
    kind: threshold
    metric: gradwatch_loss
    op: above
    value: 10
    labels: {severity: warning}
notifiers:
  - type: webhook
    url: %s
    repeat_interval: 1h
"""


class Exposition:
    """``/m/<run>``: an agent-like exposition with a loss over the rule's threshold."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                run = self.path.rsplit("/", 1)[-1]
                body = (f'gradwatch_step{{run="{run}",rank="0"}} 5\n'
                        f'gradwatch_loss{{run="{run}",rank="0"}} 100\n').encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{HOST}:{self.server.server_port}/m"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def signed_post(client: httpx.Client, secret: bytes, path: str, payload) -> httpx.Response:
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", AUTH_HEADER: sign_request(secret, "POST", path, body, time.time())}
    return client.post(path, content=body, headers=headers)


def firing_deliveries(sink: NotificationSink) -> Counter:
    counts: Counter = Counter()
    for _, payload in list(sink.received):
        for alert in payload.get("alerts", []):
            if alert.get("status") == "firing":
                counts[(alert["fingerprint"], alert["startsAt"])] += 1
    return counts


def wait_until(check, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def kill_under_write_load(workdir: Path, quick: bool) -> list[dict]:
    runs, writers, load_s = (5, 2, 1.0) if quick else (20, 4, 5.0)
    exposition = Exposition()
    config = workdir / "gradwatch.yaml"
    with NotificationSink(workdir / "notifications.jsonl") as sink:
        config.write_text(RULES % sink.url)
        acknowledged: list[str] = []
        wd = WatchdogProcess(workdir, config, interval_s=0.2).__enter__()
        try:
            secret = wd.secret_file.read_bytes()
            with httpx.Client(base_url=wd.url, timeout=5) as client:
                for i in range(runs):
                    reg = {"run": f"run-{i}", "rank": 0, "metrics_url": f"{exposition.url}/run-{i}"}
                    signed_post(client, secret, "/api/v1/runs", reg).raise_for_status()
            if not wait_until(lambda: len(firing_deliveries(sink)) >= runs, 30):
                raise RuntimeError(f"only {len(firing_deliveries(sink))} of {runs} alerts were notified")
            stop = threading.Event()
            lock = threading.Lock()

            def write(k: int) -> None:
                with httpx.Client(base_url=wd.url, timeout=5) as client:
                    n = 0
                    while not stop.is_set():
                        path = f"/api/v1/runs/run-{(k + n) % runs}/commands"
                        n += 1
                        try:
                            response = signed_post(client, secret, path, {"spec": {"action": "lower_lr"}})
                        except httpx.HTTPError:
                            return  # the watchdog is gone
                        if response.status_code == 201:
                            with lock:
                                acknowledged.append(response.json()["id"])

            threads = [threading.Thread(target=write, args=(k,)) for k in range(writers)]
            for t in threads:
                t.start()
            time.sleep(load_s)
            os.kill(wd.pid, signal.SIGKILL)
            stop.set()
            for t in threads:
                t.join(10)
        finally:
            wd.__exit__()
        with WatchdogProcess(workdir, config, interval_s=0.2) as again:
            time.sleep(2.0)  # ten rounds: any alert it would notify again is notified by now
            stored = {c["id"] for c in again.get("/api/v1/commands", limit=10_000)}
        exposition.close()
        duplicates = sum(n - 1 for n in firing_deliveries(sink).values() if n > 1)
    lost = len(set(acknowledged) - stored)
    scenario = f"kill -9 under write load ({writers} writers, {runs} firing runs)"
    return [
        {"scenario": scenario, "measure": "acknowledged commands lost", "value": f"{lost} of {len(acknowledged)}",
         "goal": "0", "met": lost == 0 and len(acknowledged) > 0},
        {"scenario": scenario, "measure": "duplicate notifications", "value": str(duplicates), "goal": "0",
         "met": duplicates == 0},
    ]


def audit_bytes(db: Path) -> tuple[int, int]:
    """(rows, bytes of their content) in the audit log, read beside the running service."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows, size = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(kind) + LENGTH(details) + COALESCE(LENGTH(run), 0) + 24), 0) FROM audit"
        ).fetchone()
    finally:
        conn.close()
    return rows, size


def refused_flood(workdir: Path, quick: bool) -> list[dict]:
    requests = 200 if quick else 1000
    with WatchdogProcess(workdir, None, interval_s=0.5) as wd:
        db = workdir / "gradwatch.db"
        rows_before, bytes_before = audit_bytes(db)
        started = time.perf_counter()
        with httpx.Client(base_url=wd.url, timeout=5) as client:
            for i in range(requests):
                body = json.dumps({"spec": {"action": "lower_lr"}, "pad": "x" * 512}).encode()
                client.post("/api/v1/runs/victim/commands", content=body,
                            headers={AUTH_HEADER: f"{time.time():.3f}.{'ab' * 16}.{i:064x}"})
        elapsed = time.perf_counter() - started
        rows_after, bytes_after = audit_bytes(db)
    scenario = f"{requests:,} refused requests (bad signatures, one client)"
    grown = bytes_after - bytes_before
    return [
        {"scenario": scenario, "measure": "audit rows added", "value": str(rows_after - rows_before),
         "goal": "≤ 2 per client and reason per minute", "met": rows_after - rows_before <= 2},
        {"scenario": scenario, "measure": "audit growth", "value": f"{grown:,} B", "goal": "≤ 4 KB",
         "met": grown <= 4096},
        {"scenario": scenario, "measure": "refusals per second", "value": f"{requests / elapsed:,.0f}", "goal": "",
         "met": None},
    ]


def run(quick: bool) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="gradwatch-faults-") as tmp:
        kill = Path(tmp) / "kill"
        flood = Path(tmp) / "flood"
        kill.mkdir()
        flood.mkdir()
        return kill_under_write_load(kill, quick) + refused_flood(flood, quick)
