"""The ladder's last rungs end to end: ``gradwatch serve`` as a process with the ladder in its rules
(clip -> LR cut -> rollback + skip -> stop, on a clock sped up as the demo's), real training runs
with snapshots on.

- An explosion the guard cannot hold (it starts at step ~100, inside the spike guard's warm-up, and
  reaches NaN/Inf within 15 steps: every later step is skipped, so clipping and LR cuts change
  nothing) is rolled back to the state before its onset and ends within 10 % of the same seed
  trained with clipping from step 0. The batches skipped are exactly those the acknowledgement names.
- Three incidents in one run with a budget of two rollbacks: the first two are rolled back and
  recover, the third is stopped, and a page says so. Every incident has its record, with its
  timeline and picture from ``gradwatch incident show``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import subprocess
import sys
import time

import pytest
import yaml

from tests.integration.watchdog_process import api, start_watchdog, wait_until
from tests.receiver import Receiver

torch = pytest.importorskip("torch")
import gradwatch.agent
from gradwatch.demo.scenarios import build, evaluate, optimizer_step, train_step

pytestmark = pytest.mark.integration
SECRET = "rollback-e2e-secret"

# The default pack's RepeatedNonFinite with the ladder, its durations divided by 10 (the rounds are
# 0.5 s, the steps tens of ms). `stop` waits longer than the rule's window: a rollback that worked
# stops the skips, and the alert resolves within one window, before the stop is due.
LADDER = {
    "name": "RepeatedNonFinite",
    "kind": "nonfinite",
    "for": 0,
    "window": "6s",
    "counters": [{"metric": "gradwatch_skipped_steps_total", "match": {"reason": "nonfinite"}}],
    "gauges": [],
    "by": ["run", "rank"],
    "min_increase": 2.5,
    "labels": {"severity": "critical"},
    "annotations": {"summary": "Repeated non-finite steps in run {{ $labels.run }}"},
    "on_fire": [
        {"action": "enable_clipping", "mode": "global_norm", "threshold": "auto"},
        {"action": "lower_lr", "factor": 0.5, "after": "1s"},
        {"action": "rollback", "skip_batches": 50, "lr_scale": 0.5, "after": "2s"},
        {"action": "stop", "after": "10s"},
    ],
}


@pytest.fixture
def watchdog(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADWATCH_SECRET", SECRET)
    monkeypatch.setenv("GRADWATCH_POLL_INTERVAL", "0.25")
    monkeypatch.setenv("GRADWATCH_COMMAND_COOLDOWN", "0.5")  # the watchdog's 15 s, on the fast clock
    monkeypatch.setenv("GRADWATCH_MAX_COMMANDS_PER_RUN", "40")
    torch.set_num_threads(1)
    with contextlib.ExitStack() as stack:
        pager = stack.enter_context(Receiver())
        config = tmp_path / "ladder.yaml"
        config.write_text(yaml.safe_dump({
            "rules": [LADDER], "notifiers": [{"type": "webhook", "name": "pager", "url": pager.url + "/page"}],
        }))
        server = start_watchdog(tmp_path / "wd", "--db", str(tmp_path / "gw.db"), "--config", str(config))
        stack.callback(server.stop)
        server.pager = pager
        server.workdir = tmp_path
        yield server


def attach(sc, run, server, **snapshots):
    return gradwatch.agent.watch(
        sc.model, sc.optimizer, run=run, port=0, watchdog_url=server.url, every=5,
        snapshots={"every": 20, "keep": 4, "include": [sc.scheduler], **snapshots},
    )


def train(sc, agent, steps: int, on_batch=None, pause_s: float = 0.0) -> dict:
    """Train until the agent has counted ``steps`` optimizer steps (a rollback sends it back), going through
    should_skip(); returns what happened to the batches."""
    stopped = []
    agent.on_stop(stopped.append)
    trained, skipped = [], []
    for batch in itertools.count():
        if agent.should_skip():
            skipped.append(batch)
            continue
        if on_batch is not None:
            on_batch(batch)
        loss = train_step(sc, batch)
        agent.observe(loss=loss)
        optimizer_step(sc)
        trained.append(batch)
        if stopped or agent.step >= steps or batch > 20 * steps:
            break
        if pause_s:
            time.sleep(pause_s)
    return {"trained": trained, "skipped": skipped, "stopped": bool(stopped)}


def acks(server, run, action):
    return [c["ack"] for c in api(server, "/api/v1/commands", run=run) if c["action"] == action and c["ack"]]


@pytest.mark.xfail(strict=False, reason=(
    "open (issue 15): after merging the loss-aware guard and the judgement of issue 12, this ladder no "
    "longer rescues early_explosion (held-out loss ~1e10 against 0.0032); under investigation"))
def test_an_explosion_clipping_cannot_hold_is_rolled_back_and_ends_near_the_clipped_reference(watchdog):
    reference = build("early_explosion", seed=0)  # the cliff at step ~103, Inf at 117: demo/scenarios.py
    reference.clip_norm = reference.info["safe_clip_norm"]
    for step in range(reference.steps):
        train_step(reference, step)
        optimizer_step(reference)
    target = evaluate(reference)

    sc = build("early_explosion", seed=0)
    agent = attach(sc, "cliff", watchdog)
    try:
        batches = train(sc, agent, sc.steps)
    finally:
        agent.close()
    final = evaluate(sc)
    print(f"\nheld-out loss: gradwatch with rollback {final:.4g}, clipped from step 0 {target:.4g} "
          f"(ratio {final / target:.3f})")
    assert math.isfinite(final) and final <= 1.10 * target

    (rollback,) = acks(watchdog, "cliff", "rollback")
    assert rollback["status"] == "applied" and rollback["restored_step"] <= 100
    first, last = map(int, re.search(r"skipping batches (\d+)-(\d+)", rollback["detail"]).groups())
    assert batches["skipped"] == list(range(first, last + 1))  # exactly the batches named, no other
    assert {a["status"] for a in acks(watchdog, "cliff", "enable_clipping") + acks(watchdog, "cliff", "lower_lr")} == {"applied"}
    assert acks(watchdog, "cliff", "stop") == []

    def closed():
        found = api(watchdog, "/api/v1/incidents", run="cliff")
        return found if found and found[0]["outcome"] != "open" else None

    (incident,) = wait_until("the incident to close", closed, timeout=30)
    assert incident["outcome"] == "rolled_back"
    assert rollback["restored_step"] < incident["onset_step"]  # back to before the onset
    record = api(watchdog, f"/api/v1/incidents/{incident['id']}")
    assert "gradwatch_grad_global_norm" in record["evidence"]
    assert any(k.startswith("gradwatch_grad_norm{") for k in record["evidence"])
    kinds = [e["kind"] for e in record["timeline"]]
    assert kinds.index("alert.firing") < kinds.index("command.decided") < kinds.index("command.acked")
    png = watchdog.workdir / "incident.png"
    shown = subprocess.run(
        [sys.executable, "-m", "gradwatch.watchdog.cli", "incident", "show", incident["id"], "--url", watchdog.url,
         "-o", str(png)], capture_output=True, text=True, timeout=60, check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert f"restored step {rollback['restored_step']}" in shown.stdout and "outcome: rolled_back" in shown.stdout
    assert png.stat().st_size > 10_000


def test_two_incidents_within_the_budget_are_rolled_back_and_the_third_is_stopped_with_a_page(watchdog):
    sc = build("healthy_mlp", seed=0, steps=100_000)
    agent = attach(sc, "flips", watchdog, max_rollbacks=2)
    corrupted = []

    def on_batch(batch):
        """A corrupted weight (a bit flip in memory) once the previous incident is over: every later step is
        NaN, the guard skips them all, and only going back helps."""
        if len(corrupted) == 3 or batch < 100 or batch % 20:
            return
        if corrupted and (batch - corrupted[-1] < 150 or [i for i in api(watchdog, "/api/v1/incidents", run="flips")
                                                          if i["outcome"] == "open"]):
            return
        with torch.no_grad():
            sc.model.layers[0].weight[0, 0] = float("inf")
        corrupted.append(batch)

    try:
        batches = train(sc, agent, 100_000, on_batch, pause_s=0.01)
    finally:
        agent.close()
    assert batches["stopped"] and len(corrupted) == 3

    rollbacks = [c for c in api(watchdog, "/api/v1/commands", run="flips") if c["action"] == "rollback"]
    statuses = [c["ack"]["status"] for c in sorted(rollbacks, key=lambda c: c["seq"])]
    assert statuses == ["applied", "applied", "refused"], rollbacks
    refused = max(rollbacks, key=lambda c: c["seq"])["ack"]
    assert "rollback budget spent: 2 rollbacks" in refused["detail"]
    assert [a["status"] for a in acks(watchdog, "flips", "stop")] == ["applied"]

    def three_closed():
        found = api(watchdog, "/api/v1/incidents", run="flips")
        return found if len(found) == 3 and all(i["outcome"] != "open" for i in found) else None

    incidents = wait_until("three closed incidents", three_closed, timeout=30)
    assert [i["outcome"] for i in reversed(incidents)] == ["rolled_back", "rolled_back", "stopped"]

    def page():
        for request in watchdog.pager.successful():
            for alert in request.json()["alerts"]:
                if alert["labels"].get("alertname") == "GradwatchStoppedRun":
                    return alert
        return None

    stopped = wait_until("the page saying the run was stopped", page, timeout=15)
    assert stopped["labels"]["severity"] == "critical" and stopped["labels"]["run"] == "flips"
    assert stopped["annotations"]["incident"].endswith(f"/api/v1/incidents/{incidents[0]['id']}")
    # Every critical notification links to its incident record.
    firing = [a for r in watchdog.pager.successful() for a in r.json()["alerts"] if a["labels"]["alertname"] == LADDER["name"]]
    assert firing and all("/api/v1/incidents?run=flips&alert=" in a["annotations"]["incident"] for a in firing)
