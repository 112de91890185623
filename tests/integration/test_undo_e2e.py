"""Undo, end to end: the real ``gradwatch serve`` remediates a run hit by repeated NaN batches, then
gives it back its learning rate and turns its clipping off once it has been healthy for a while.

The default rule pack runs on a clock 10x faster (as the demo does) and ``restore_after``
is 3 s, so the whole incident takes seconds; steps are paced at ~20 ms.
"""

from __future__ import annotations

import contextlib
import math
import time

import pytest
import yaml

from tests.integration.watchdog_process import api, start_watchdog

torch = pytest.importorskip("torch")
import gradwatch.agent  # noqa: E402
from gradwatch.demo.rules import default_rules  # noqa: E402
from tests.agent.models import MLP, loss_of  # noqa: E402

pytestmark = pytest.mark.integration
SECRET = "undo-secret"


@pytest.fixture
def watchdog(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADWATCH_SECRET", SECRET)
    monkeypatch.setenv("GRADWATCH_POLL_INTERVAL", "0.25")
    monkeypatch.setenv("GRADWATCH_RESTORE_AFTER", "3s")
    torch.set_num_threads(1)
    config = tmp_path / "rules.yaml"
    config.write_text(yaml.safe_dump({"rules": [r.model_dump(mode="json", by_alias=True) for r in default_rules(10.0)]}))
    with contextlib.ExitStack() as stack:
        server = start_watchdog(tmp_path / "wd", "--db", str(tmp_path / "gw.db"), "--config", str(config))
        stack.callback(server.stop)
        yield server


def test_repeated_nan_batches_are_remediated_then_the_remediation_is_undone(watchdog):
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    agent = gradwatch.agent.watch(model, opt, run="undo", port=0, watchdog_url=watchdog.url, every=5)
    gen = torch.Generator().manual_seed(0)
    state = {"step": 0}

    def step(poison=False):
        opt.zero_grad()
        loss = loss_of(model, model.example(gen))
        (loss * float("nan") if poison else loss).backward()
        agent.observe(loss=loss)
        opt.step()
        state["step"] += 1
        time.sleep(0.02)

    try:
        for _ in range(100):  # ~2 s of calm: several scrapes, the agent's healthy history
            step()
        for _ in range(3):  # three NaN batches in a row: RepeatedNonFinite
            step(poison=True)

        def applied(action):
            return [c for c in api(watchdog, "/api/v1/commands", run="undo")
                    if c["action"] == action and c["ack"] and c["ack"]["status"] == "applied"]

        def trained_until(check, timeout=40.0):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                result = check()
                if result:
                    return result
                for _ in range(10):
                    step()
            raise AssertionError(f"timed out; commands: {api(watchdog, '/api/v1/commands', run='undo')}")

        trained_until(lambda: applied("enable_clipping") and applied("lower_lr"))
        assert agent.remedy.clipping_active and agent.remedy.lr_scale < 1.0
        # healthy again: the alert resolves, and 3 s later the LR comes back x2 per step, then clipping goes
        trained_until(lambda: applied("disable_clipping"), timeout=60.0)
        assert (agent.remedy.lr_scale, agent.remedy.clipping_active) == (1.0, False)
        commands = sorted(api(watchdog, "/api/v1/commands", run="undo"), key=lambda c: c["seq"])
        lowest = min(c["ack"]["lr_scale"] for c in commands if c["ack"] and c["ack"]["status"] == "applied")
        restores = [c["action"] for c in commands if c["rule"] == "gradwatch:restore"]
        assert restores == ["restore_lr"] * round(math.log2(1 / lowest)) + ["disable_clipping"]
        kinds = {e["kind"] for e in api(watchdog, "/api/v1/audit", run="undo", limit=500)}
        assert "remediation.restore_abandoned" not in kinds
    finally:
        agent.close()
