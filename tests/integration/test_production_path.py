"""The production path, end to end, against the real servers.

A training run with the agent attached goes wrong for real (the exploding RNN of
demo/scenarios.py: its LR warm-up passes the stability edge; the agent's guard clips
the gradient spikes locally). A real Prometheus scrapes the agent and evaluates the
default pack as `gradwatch rules export` writes it; an exported rule fires; a real
Alertmanager routes it to the watchdog's webhook receiver (bearer secret from a
credentials file); the watchdog, in Prometheus mode, turns the alert's
``gradwatch_action`` labels into a signed command; the agent polls it, applies it at a
step and acknowledges it; and Prometheus scrapes the effect (clipping on, or a lower
LR scale) from the agent.

The watchdog runs with no rules of its own (``rules: []``): in this deployment
Prometheus evaluates the rules, and the watchdog only remediates what Alertmanager
forwards. With its default pack it would also evaluate the same rules on the same
series and could issue the same command itself: the test could not tell which path
delivered it.

Timing is Prometheus-sized, not production-sized: 500 ms scrape and evaluation
intervals, Alertmanager's group_wait/group_interval 1 s, the agent polling every
1 s (the watchdog's default). The latency from the first step the guard clipped to
the command taking effect is printed with its breakdown (pytest -s to see it).
Every server and process is stopped at the end, also on failure.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.servers import (
    ALERTMANAGER_BIN,
    PROMETHEUS_BIN,
    Server,
    free_port,
    require_binary,
    start_alertmanager,
    start_prometheus,
)
from tests.integration.watchdog_process import api, start_watchdog, wait_until

torch = pytest.importorskip("torch")
import gradwatch.agent  # noqa: E402
from gradwatch.demo.scenarios import build, optimizer_step, train_step  # noqa: E402
from gradwatch.watchdog import metric_names as mn  # noqa: E402

pytestmark = pytest.mark.integration

SECRET = "production-path-secret"
RUN = "prod-path"
INTERVAL = "500ms"  # Prometheus's scrape and evaluation interval, and the exported group's
# On this CPU an exploding_rnn step takes ~9 ms, so one 500 ms scrape covers ~50 steps and
# the chain (scrape, evaluation, group_wait, poll: ~3 s) hundreds: the run could end before
# the command arrives, and "latency in steps" would say little. From the first clipped
# spike on, each step is therefore stretched to at least PACE_S (a real step takes far
# longer). The latency in steps below is at this pace; the latency in seconds does not
# depend on it.
PACE_S = 0.02
STEPS_AFTER = 25  # steps trained with the remedy in force before the loop stops
TRAIN_BUDGET_S = 45.0  # the loop stops here whatever happened (the assertions then say what did not)

ALERTMANAGER_CONFIG = """\
route:
  receiver: gradwatch-watchdog
  group_by: [alertname, run, rank]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: gradwatch-watchdog
    webhook_configs:
      - url: {watchdog}/api/v1/alertmanager
        send_resolved: true
        http_config:
          authorization:
            type: Bearer
            credentials_file: {secret_file}
"""

PROMETHEUS_CONFIG = """\
global:
  scrape_interval: {interval}
  scrape_timeout: {interval}
  evaluation_interval: {interval}
rule_files:
  - {rules}
alerting:
  alertmanagers:
    - static_configs:
        - targets: ['{alertmanager}']
scrape_configs:
  - job_name: trainer
    static_configs:
      - targets: ['{agent}']
"""


@pytest.fixture
def stack():
    """Everything started registers its stop here; all of it stops, in reverse, even on failure."""
    with contextlib.ExitStack() as s:
        yield s


def promql(prometheus: Server, query: str) -> list[dict]:
    """An instant query through Prometheus's HTTP API: the result vector (or matrix)."""
    body = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": query}, timeout=5).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def prometheus_api(prometheus: Server, path: str) -> dict:
    body = httpx.get(f"{prometheus.url}/api/v1/{path}", timeout=5).json()
    assert body["status"] == "success", body
    return body["data"]


def rfc3339(text: str) -> float:
    """Prometheus's ``activeAt`` (nanosecond RFC 3339) as epoch seconds."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(text).timestamp()


def first_scraped(prometheus: Server, selector: str, holds, lookback: str = "5m") -> float | None:
    """When Prometheus first scraped a sample of ``selector`` whose value ``holds``, else None."""
    samples = [(float(t), float(v)) for s in promql(prometheus, f"{selector}[{lookback}]") for t, v in s["values"]]
    return min((t for t, v in samples if holds(v)), default=None)


def export_default_pack(path: Path) -> None:
    """``gradwatch rules export --format prometheus``, as an operator runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "gradwatch.watchdog.cli", "rules", "export", "--format", "prometheus",
         "--interval", INTERVAL, "-o", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "GradientSpikesHeld" in path.read_text()


@pytest.mark.xfail(strict=False, reason=(
    "open (issue 12/13 merge): the Alertmanager-triggered enable_clipping is now judged like a policy step, "
    "and on this run (the guard holds the spikes, the loss does not rise) it is held back for want of "
    "evidence of harm; the test still expects the remedy on the spike alone"))
def test_an_exported_rule_fires_in_prometheus_and_the_agent_applies_the_remedy(tmp_path, monkeypatch, stack):
    require_binary(PROMETHEUS_BIN)
    require_binary(ALERTMANAGER_BIN)
    monkeypatch.setenv("GRADWATCH_SECRET", SECRET)  # the watchdog subprocess and the agent read it
    torch.set_num_threads(1)

    # Prometheus, Alertmanager and the watchdog each need another's address before it runs:
    # the watchdog's and the agent's ports are chosen first.
    watchdog_port, agent_port = free_port(), free_port()
    watchdog_url = f"http://127.0.0.1:{watchdog_port}"
    secret_file = tmp_path / "gradwatch-secret"
    secret_file.write_text(SECRET)  # Alertmanager reads the bearer credentials from a file
    secret_file.chmod(0o600)
    am_config = ALERTMANAGER_CONFIG.format(watchdog=watchdog_url, secret_file=secret_file)
    alertmanager = start_alertmanager(am_config, tmp_path)
    stack.callback(alertmanager.stop)

    rules = tmp_path / "gradwatch.rules.yml"
    export_default_pack(rules)
    prometheus = start_prometheus(
        PROMETHEUS_CONFIG.format(
            interval=INTERVAL, rules=rules, alertmanager=alertmanager.url.removeprefix("http://"),
            agent=f"127.0.0.1:{agent_port}",
        ),
        tmp_path,
    )
    stack.callback(prometheus.stop)

    config = tmp_path / "watchdog.yaml"
    config.write_text("rules: []  # Prometheus evaluates the rules; the watchdog remediates what Alertmanager sends\n")
    watchdog = start_watchdog(
        tmp_path / "watchdog", "--prometheus-url", prometheus.url, "--config", str(config),
        "--db", str(tmp_path / "gradwatch.db"), port=watchdog_port,
    )
    stack.callback(watchdog.stop)
    servers = (alertmanager, prometheus, watchdog)

    sc = build("exploding_rnn", seed=0)
    agent = gradwatch.agent.watch(sc.model, sc.optimizer, run=RUN, port=agent_port, watchdog_url=watchdog_url)
    stack.callback(agent.close)

    try:
        assert api(watchdog, "/healthz")["source"] == "prometheus"
        wait_until("the agent to register with the watchdog", lambda: api(watchdog, "/api/v1/runs", run=RUN))
        # Prometheus applies its targets (and finds its Alertmanager) ~5 s after it is ready.
        wait_until("Prometheus scraping the agent", lambda: promql(prometheus, 'up{job="trainer"} == 1'), timeout=20)
        wait_until("Prometheus knowing its Alertmanager",
                   lambda: prometheus_api(prometheus, "alertmanagers")["activeAlertmanagers"], timeout=20)

        def remedied() -> bool:
            return agent.remedy.clip_mode is not None or agent.remedy.lr_scale < 1

        clipped: list[tuple[int, float]] = []  # (agent step, wall time) of each step the guard clipped
        in_force_at: int | None = None  # the first agent step trained with the remedy in force
        deadline = time.monotonic() + TRAIN_BUDGET_S
        for step in range(sc.steps):
            started = time.monotonic()
            loss = train_step(sc, step)
            agent.observe(loss=loss)
            optimizer_step(sc)
            count = agent.registry.get_sample_value(mn.SPIKE_CLIPPED_STEPS_TOTAL, {"run": RUN, "rank": "0"}) or 0
            while len(clipped) < count:  # the guard clips at most one step per step
                clipped.append((agent.step, time.time()))
            if in_force_at is None and remedied():
                in_force_at = agent.step
            if (in_force_at is not None and agent.step >= in_force_at + STEPS_AFTER) or time.monotonic() > deadline:
                break
            if clipped:
                time.sleep(max(0.0, PACE_S - (time.monotonic() - started)))  # see PACE_S

        assert clipped, "the guard clipped no spike: the run did not go wrong"
        assert in_force_at is not None, (
            f"no remedy in force after {agent.step} steps; clipped at steps {[s for s, _ in clipped][:10]}"
        )

        # 1. An exported rule fired in Prometheus, with its remediation labels.
        firing = wait_until(
            "an exported rule firing in Prometheus",
            lambda: [a for a in prometheus_api(prometheus, "alerts")["alerts"]
                     if a["state"] == "firing" and a["labels"].get("run") == RUN and "gradwatch_action" in a["labels"]],
        )
        series = promql(prometheus, f'ALERTS{{alertstate="firing",run="{RUN}"}}')
        assert {a["labels"]["alertname"] for a in firing} <= {s["metric"]["alertname"] for s in series}

        # 2. Alertmanager routed it to the watchdog, which issued the command it names.
        def issued_from_webhook() -> list[tuple[dict, dict]]:
            entries = api(watchdog, "/api/v1/audit", kind="alertmanager.received", limit=1000)
            return [(e, o) for e in entries for o in e["details"]["outcomes"] if o["result"] == "issued"]

        wait_until("the watchdog to take a command from Alertmanager's webhook", issued_from_webhook)
        commands = api(watchdog, "/api/v1/commands", run=RUN)
        received_at = {o["command_id"]: e["time"] for e, o in issued_from_webhook()}  # read after the commands
        assert commands and {c["id"] for c in commands} <= set(received_at), "every command came through Alertmanager"
        first = min(commands, key=lambda c: c["seq"])
        alert = next((a for a in firing if a["labels"]["alertname"] == first["rule"]), None)
        assert alert is not None, f"command for {first['rule']}, firing in Prometheus: {[a['labels'] for a in firing]}"
        assert first["action"] == alert["labels"]["gradwatch_action"]

        # 3. The agent applied it, at a step.
        def acked() -> dict | None:
            command = next(c for c in api(watchdog, "/api/v1/commands", run=RUN) if c["id"] == first["id"])
            return command if command["ack"] else None

        first = wait_until("the agent's acknowledgement", acked, timeout=10)
        ack = first["ack"]
        assert ack["status"] == "applied" and ack["step"] == in_force_at, ack

        # 4. Prometheus scraped the effect from the agent.
        effect = f'{mn.CLIPPING_ACTIVE}{{run="{RUN}"}} == 1 or {mn.LR_SCALE}{{run="{RUN}"}} < 1'
        wait_until("Prometheus to scrape the remedy in force", lambda: promql(prometheus, effect), timeout=10)
        if first["action"] == "enable_clipping":
            assert promql(prometheus, f'{mn.CLIPPING_ACTIVE}{{run="{RUN}"}} == 1')
        elif first["action"] == "lower_lr":
            assert promql(prometheus, f'{mn.LR_SCALE}{{run="{RUN}"}} < 1')
        visible_at = min(
            (t for t in (first_scraped(prometheus, f'{mn.CLIPPING_ACTIVE}{{run="{RUN}"}}', lambda v: v == 1),
                         first_scraped(prometheus, f'{mn.LR_SCALE}{{run="{RUN}"}}', lambda v: v < 1)) if t is not None),
            default=None,
        )
    except BaseException:
        for server in servers:
            print(f"\n--- {server.name} log ---\n{server.log_tail()}")
        raise

    # The latency, from the first step the guard clipped to the command taking effect.
    bad_step, bad_at = clipped[0]
    scraped_at = first_scraped(prometheus, f'{mn.SPIKE_CLIPPED_STEPS_TOTAL}{{run="{RUN}"}}', lambda v: v > 0)
    fired_at = rfc3339(alert["activeAt"])  # for: 0, so active = firing
    clipped_by_then = sum(t <= fired_at for _, t in clipped)
    timeline = [
        (f"first clipped spike (agent step {bad_step})", bad_at),
        *((f"clipped spike #{i} (step {s})", t) for i, (s, t) in enumerate(clipped[1:3], 2)),
        ("Prometheus scraped the counter > 0", scraped_at),
        (f"{alert['labels']['alertname']} firing in Prometheus (activeAt; {clipped_by_then} clipped)", fired_at),
        (f"{first['action']} issued by the webhook receiver", first["issued_at"]),
        ("webhook handled (audit alertmanager.received)", received_at[first["id"]]),
        ("command delivered to the agent (its poll)", first["delivered_at"]),
        (f"applied by the agent at step {ack['step']} (ack)", ack["at"]),
        ("first Prometheus scrape showing it", visible_at),
    ]
    print(
        f"\nproduction path, first bad step -> command in effect: {ack['at'] - bad_at:.2f} s, "
        f"{ack['step'] - bad_step} steps (>= {PACE_S * 1000:.0f} ms/step after the first spike)"
    )
    for what, t in timeline:
        print(f"  {what:<62}" + ("?" if t is None else f"{t - bad_at:+6.2f} s"))
    assert bad_at <= fired_at <= first["issued_at"] <= first["delivered_at"] <= ack["at"]
