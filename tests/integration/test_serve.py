"""``gradwatch serve`` as a real process, watching real training runs with the agent attached.

1. Direct scrape, default rule pack: two LSTM runs of the same model train side by
   side; one diverges (its learning rate jumps past SGD's stability limit, see
   training.py). The diverging run fires an alert and the webhook gets it; the
   healthy run gets none over the same time. The service is then SIGKILLed and
   restarted on the same database: the firing alert and the audit log are still
   there, and the notification is not sent again.
2. Prometheus mode: a real Prometheus scrapes a real agent; the service started with
   ``--prometheus-url`` sees the agent's series and fires the same alert.
3. SIGHUP reloads the config (a bad file keeps the old rules); SIGTERM exits 0.

Every process and server started is stopped at the end, also on failure. The
measured times (first exploding step → alert firing → webhook) are printed.
"""

from __future__ import annotations

import contextlib
import re
import signal
import time

import httpx
import pytest

from tests.integration.servers import Server, start_prometheus
from tests.integration.watchdog_process import INTERVAL, api, start_watchdog, wait_until

torch = pytest.importorskip("torch")
from tests.integration.training import Run, Trainer  # noqa: E402  (needs torch)

pytestmark = pytest.mark.integration

HEALTHY_S = 16.0  # long enough for every default rule with a short warm-up (GradNormSpike: 30 samples) to be armed
NONFINITE = {"alertname": "GradNonFinite", "rank": "0", "severity": "critical"}


@pytest.fixture
def stack():
    """Everything started in a test registers its stop here; all of it stops, in reverse, even on failure."""
    with contextlib.ExitStack() as s:
        yield s


def firing(server: Server, run: str) -> list[dict]:
    return api(server, "/api/v1/alerts", run=run, state="firing")


def firing_notices(receiver, fingerprint: str) -> int:
    """How many webhook deliveries told of ``fingerprint`` firing."""
    alerts = [a for r in receiver.successful() for a in r.json()["alerts"]]
    return sum(1 for a in alerts if a["fingerprint"] == fingerprint and a["status"] == "firing")


def firing_alert(server: Server, run: str, name: str) -> dict | None:
    return {a["labels"]["alertname"]: a for a in firing(server, run)}.get(name)


def start_runs(stack: contextlib.ExitStack, *names: str) -> tuple[list[Run], Trainer]:
    runs = [Run(name) for name in names]
    for run in runs:
        stack.callback(run.close)
    trainer = Trainer(runs).start()
    stack.callback(trainer.stop)
    return runs, trainer


def test_a_diverging_run_alerts_a_healthy_one_does_not_and_a_restart_keeps_state(tmp_path, receiver, stack):
    config = tmp_path / "gradwatch.yaml"
    # No `rules:`: the built-in default pack, as a user gets it.
    config.write_text(f"notifiers:\n  - type: webhook\n    url: {receiver.url}/hook\n")
    db = str(tmp_path / "gradwatch.db")
    watchdog = start_watchdog(tmp_path / "a", "--config", str(config), "--db", db)
    stack.callback(watchdog.stop)

    (healthy, sick), _ = start_runs(stack, "healthy", "sick")
    for run in (healthy, sick):
        body = {"run": run.name, "rank": 0, "metrics_url": run.agent.url}
        response = httpx.post(f"{watchdog.url}/api/v1/runs", json=body, timeout=5)
        assert response.status_code == 201, response.text
        assert response.json()["scrape_interval_s"] == float(INTERVAL)

    time.sleep(HEALTHY_S)
    assert [(r["run"], r["stale"]) for r in api(watchdog, "/api/v1/runs")] == [("healthy", False), ("sick", False)]
    assert api(watchdog, "/api/v1/alerts") == [], "no alert while both runs are healthy"

    sick.explode()
    alerts = wait_until("the diverging run's alert", lambda: firing(watchdog, "sick"))
    (request,) = receiver.wait_for(1, timeout=10)
    webhook_at = time.time()
    notice = request.json()
    assert notice["status"] == "firing" and notice["alerts"][0]["labels"]["run"] == "sick"
    nonfinite = wait_until("GradNonFinite", lambda: firing_alert(watchdog, "sick", "GradNonFinite"))
    assert nonfinite["labels"] == {**NONFINITE, "run": "sick"}
    first = min(alerts, key=lambda a: a["fired_at"])
    print(
        f"\nfirst exploding step -> {first['labels']['alertname']} firing: {first['fired_at'] - sick.exploded_at:.2f} s, "
        f"webhook received: {webhook_at - sick.exploded_at:.2f} s (scrape interval {INTERVAL} s; "
        f"firing at first: {sorted(a['labels']['alertname'] for a in alerts)})"
    )

    time.sleep(2)  # the healthy run keeps training beside the broken one
    assert api(watchdog, "/api/v1/alerts", run="healthy") == []
    assert api(watchdog, "/api/v1/alerts/history", run="healthy") == [], "not even a pending alert for the healthy run"

    # SIGKILL once every firing alert was delivered, then a new process on the same database.
    fingerprints = {a["fingerprint"] for a in firing(watchdog, "sick")}
    wait_until("every firing alert delivered", lambda: all(firing_notices(receiver, fp) for fp in fingerprints))
    fingerprint = nonfinite["fingerprint"]
    sent_before = firing_notices(receiver, fingerprint)
    assert sent_before == 1
    watchdog.process.kill()
    watchdog.process.wait(10)
    restarted = start_watchdog(tmp_path / "b", "--config", str(config), "--db", db)
    stack.callback(restarted.stop)

    still = {a["fingerprint"]: a for a in firing(restarted, "sick")}
    assert fingerprint in still and still[fingerprint]["fired_at"] == nonfinite["fired_at"]
    kinds = {e["kind"] for e in api(restarted, "/api/v1/audit", run="sick", limit=1000)}
    assert {"run.registered", "alert.firing", "notify.sent"} <= kinds
    time.sleep(3)  # six rounds of the restarted watchdog
    assert firing_notices(receiver, fingerprint) == sent_before, "a delivered notification was sent again"
    assert fingerprint in {a["fingerprint"] for a in firing(restarted, "sick")}
    assert api(restarted, "/api/v1/alerts/history", run="healthy") == []

    restarted.process.send_signal(signal.SIGTERM)
    assert restarted.process.wait(15) == 0


def test_prometheus_mode_sees_the_agents_series_and_fires_the_same_alert(tmp_path, stack):
    (sick,), _ = start_runs(stack, "sick")
    target = sick.agent.url.removeprefix("http://").removesuffix("/metrics")
    prometheus = start_prometheus(
        "global:\n  scrape_interval: 500ms\n  scrape_timeout: 500ms\n"
        f"scrape_configs:\n  - job_name: trainer\n    static_configs:\n      - targets: ['{target}']\n",
        tmp_path,
    )
    stack.callback(prometheus.stop)
    watchdog = start_watchdog(tmp_path / "watchdog", "--prometheus-url", prometheus.url, "--db", str(tmp_path / "gw.db"))
    stack.callback(watchdog.stop)

    def exported() -> int:  # gradwatch series in the agent's own exposition (what a direct scrape would store)
        text = httpx.get(sick.agent.url, timeout=5).text
        return len({line.split(" ")[0] for line in text.splitlines() if re.match(r"gradwatch_\w+(?<!_created)[{ ]", line)})

    wait_until("every series the agent exports", lambda: api(watchdog, "/healthz")["series"] == exported() > 0)
    health = api(watchdog, "/healthz")
    assert health["source"] == "prometheus" and health["runs"] == 0  # nothing registered: Prometheus finds the agent
    assert api(watchdog, "/api/v1/alerts") == []

    sick.explode()
    alert = wait_until("GradNonFinite via Prometheus", lambda: firing_alert(watchdog, "sick", "GradNonFinite"))
    assert alert["labels"] == {**NONFINITE, "run": "sick"}
    print(f"\nPrometheus mode: first exploding step -> GradNonFinite firing: {alert['fired_at'] - sick.exploded_at:.2f} s")


def test_sighup_reloads_a_bad_file_keeps_the_old_rules_and_sigterm_exits_cleanly(tmp_path, stack):
    rule = "  - name: {name}\n    kind: threshold\n    metric: gradwatch_loss\n    op: above\n    value: 10\n"
    config = tmp_path / "gradwatch.yaml"
    config.write_text("rules:\n" + rule.format(name="LossHigh"))
    watchdog = start_watchdog(tmp_path, "--config", str(config), "--db", str(tmp_path / "gw.db"))
    stack.callback(watchdog.stop)
    assert list(api(watchdog, "/healthz")["rules"]) == ["LossHigh"]

    config.write_text("rules:\n" + rule.format(name="LossHigh").replace("op: above", "op: over"))
    watchdog.process.send_signal(signal.SIGHUP)
    (failed,) = wait_until("the failed reload", lambda: api(watchdog, "/api/v1/audit", kind="config.reload_failed"))
    assert "rules[0].op (line 5)" in failed["details"]["problems"][0]
    assert list(api(watchdog, "/healthz")["rules"]) == ["LossHigh"] and watchdog.process.poll() is None

    config.write_text("rules:\n" + rule.format(name="LossHigh") + rule.format(name="LossVeryHigh"))
    watchdog.process.send_signal(signal.SIGHUP)
    wait_until("the new rule", lambda: list(api(watchdog, "/healthz")["rules"]) == ["LossHigh", "LossVeryHigh"])

    watchdog.process.send_signal(signal.SIGTERM)
    assert watchdog.process.wait(15) == 0
    assert "gradwatch watchdog stopped" in watchdog.log_tail()
