"""Remediation end to end: ``gradwatch serve`` as a process, real training runs with the agent attached.

The exploding recurrent network (demo/scenarios.py: a tanh RNN whose learning-rate
warm-up passes the stability edge) is saved by the default rule pack's policies —
the agent's guard holds the spikes locally, the watchdog enables clipping and
lowers the LR — and ends near the same seed trained with clipping from step 0,
while the unprotected run diverges. A NaN batch is survived, a healthy run gets no
command, and killing the watchdog mid-run neither stops training nor loses the
audit log. Measured latencies are printed (run pytest with -s to see them).
"""

from __future__ import annotations

import contextlib
import math
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.watchdog_process import api, start_watchdog, wait_until

torch = pytest.importorskip("torch")
import gradwatch.agent  # noqa: E402
from gradwatch.demo.scenarios import build, evaluate, optimizer_step, train_step  # noqa: E402

pytestmark = pytest.mark.integration
SECRET = "e2e-secret"


@pytest.fixture
def watchdog(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADWATCH_SECRET", SECRET)  # the watchdog subprocess and the agents read it
    # These steps take ~5 ms, a real one ~1 s: at the default 1-s poll a command lands 200 steps
    # after the alert, past the cliff; 0.25 s keeps it within the few dozen a real run would see.
    monkeypatch.setenv("GRADWATCH_POLL_INTERVAL", "0.25")
    torch.set_num_threads(1)
    with contextlib.ExitStack() as stack:
        server = start_watchdog(tmp_path / "wd", "--db", str(tmp_path / "gw.db"))
        stack.callback(server.stop)
        server.workdir = tmp_path
        yield server


def train(scenario, agent=None, on_step=None) -> float:
    """The standard loop; returns the held-out loss at the end."""
    for step in range(scenario.steps):
        loss = train_step(scenario, step)
        if agent is not None:
            agent.observe(loss=loss)
        optimizer_step(scenario)
        if on_step is not None:
            on_step(step)
    return evaluate(scenario)


def attach(scenario, run: str, server):
    return gradwatch.agent.watch(scenario.model, scenario.optimizer, run=run, port=0, watchdog_url=server.url)


def test_exploding_rnn_is_saved_by_the_default_policies(watchdog):
    unprotected = train(build("exploding_rnn", seed=0))
    sc = build("exploding_rnn", seed=0)
    reference = train(build("exploding_rnn", seed=0, clip_norm=sc.info["safe_clip_norm"]))

    agent = attach(sc, "explode", watchdog)
    protected = train(sc, agent)
    agent.close()

    assert not math.isfinite(unprotected) or unprotected > 10 * reference  # without gradwatch: diverged
    assert math.isfinite(protected)
    assert all(torch.isfinite(p).all() for p in sc.model.parameters())
    print(f"\nfinal held-out loss: unprotected {unprotected:.4g}, gradwatch {protected:.4g}, "
          f"clipped from step 0 {reference:.4g} (ratio {protected / reference:.3f})")
    assert protected <= 1.25 * reference  # the goal is 1.10; timing on a loaded machine varies

    commands = api(watchdog, "/api/v1/commands", run="explode")
    # Clipping first; the LR cut follows only if the spikes go on 5 s later (timing-dependent).
    assert "enable_clipping" in {c["action"] for c in commands}
    fired = min(e["time"] for e in api(watchdog, "/api/v1/audit", run="explode", kind="alert.firing"))
    first = min(commands, key=lambda c: c["seq"])
    assert first["ack"]["status"] == "applied"
    # A later escalation may be issued as the run ends, and never be picked up: only
    # what was acknowledged is checked, and nothing is refused for bad authentication.
    assert all(c["ack"]["status"] in ("applied", "refused") for c in commands if c["ack"])
    print(f"rule fired -> command decided {first['issued_at'] - fired:.2f} s -> applied at step {first['ack']['step']} "
          f"{first['ack']['at'] - fired:.2f} s after firing")
    assert first["ack"]["at"] - fired < 0.25 + 2.0  # one poll interval plus one step, with slack for load


def test_nan_batch_is_survived_and_a_healthy_run_gets_no_command(watchdog):
    sick = build("nan_batch", seed=0)
    agent = attach(sick, "nan-batch", watchdog)
    final = train(sick, agent)
    skipped = agent.registry.get_sample_value(
        "gradwatch_skipped_steps_total", {"run": "nan-batch", "rank": "0", "reason": "nonfinite"}
    )
    agent.close()
    assert math.isfinite(final) and skipped == 1

    healthy = build("healthy_rnn", seed=0)
    agent = attach(healthy, "healthy", watchdog)
    train(healthy, agent)
    agent.close()
    assert api(watchdog, "/api/v1/commands", run="healthy") == []
    assert [a for a in api(watchdog, "/api/v1/alerts", run="healthy") if a["labels"]["severity"] == "critical"] == []


def test_killing_the_watchdog_mid_run_never_stops_training(watchdog, tmp_path):
    sc = build("healthy_rnn", seed=0)
    agent = attach(sc, "resilient", watchdog)
    wait_until("registration", lambda: api(watchdog, "/api/v1/runs", run="resilient"))
    before = api(watchdog, "/api/v1/audit", run="resilient")
    servers = [watchdog]
    slowest = 0.0
    last = time.monotonic()

    def on_step(step: int) -> None:
        nonlocal slowest, last
        now = time.monotonic()
        slowest, last = max(slowest, now - last), now
        if step == sc.steps // 3:
            servers[0].process.send_signal(signal.SIGKILL)
            servers[0].process.wait()
        if step == 2 * sc.steps // 3:
            port = int(watchdog.url.rsplit(":", 1)[1])  # where the agent will look for it again
            servers[0] = start_watchdog(tmp_path / "wd2", "--db", str(tmp_path / "gw.db"), port=port)
            last = time.monotonic()  # the restart itself is the test's time, not a training step's

    try:
        final = train(sc, agent, on_step)
        assert math.isfinite(final) and agent.step == sc.steps
        assert slowest < 1.0  # no step waited on the dead watchdog

        def registered_again():
            entries = api(servers[0], "/api/v1/audit", run="resilient", kind="run.registered")
            return len(entries) >= 2 and entries

        wait_until("the agent to register with the restarted watchdog", registered_again)
        after = api(servers[0], "/api/v1/audit", run="resilient", limit=1000)
        assert {e["id"] for e in before} <= {e["id"] for e in after}  # nothing lost across SIGKILL
    finally:
        agent.close()
        servers[0].stop()


def test_operator_command_from_the_cli_reaches_the_trainer(watchdog):
    sc = build("healthy_rnn", seed=0)
    agent = attach(sc, "manual", watchdog)
    cli = [sys.executable, "-m", "gradwatch.watchdog.cli", "command", "manual", "lower-lr", "--factor", "0.5",
           "--url", watchdog.url]
    result = subprocess.run(cli, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "issued lower_lr to manual" in result.stdout
    bad = subprocess.run([*cli[:-4], "--factor", "2", "--url", watchdog.url], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "factor" in bad.stderr
    step = 0
    while agent.remedy.lr_scale == 1.0 and step < sc.steps:
        train_step(sc, step)
        optimizer_step(sc)
        step += 1
    agent.close()
    (command,) = api(watchdog, "/api/v1/commands", run="manual")
    assert command["ack"]["status"] == "applied" and command["ack"]["lr_scale"] == 0.5
    assert command["rule"] is None  # an operator's, not a policy's
