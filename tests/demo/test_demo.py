"""``gradwatch demo`` end to end, as a user runs it: the README's main command
(``bash scripts/demo.sh``), each scenario, the files it names, no process left behind,
and ``--keep-running``.

The scripts run with GRADWATCH_VENV set to the interpreter running the tests, so they
use this environment instead of building a fresh .venv.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")
from gradwatch.demo.rules import default_rules, write_config  # noqa: E402
from gradwatch.watchdog.config_file import load_config  # noqa: E402
from gradwatch.watchdog.rules.loader import load_rules  # noqa: E402

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "GRADWATCH_VENV": sys.prefix, "PYTHONUNBUFFERED": "1"}


def demo(out: Path, *args: str, script: bool = False) -> subprocess.CompletedProcess:
    command = ["bash", str(ROOT / "scripts" / "demo.sh")] if script else [sys.executable, "-m", "gradwatch.watchdog.cli", "demo"]
    return subprocess.run([*command, "--out", str(out), *args], capture_output=True, text=True, timeout=240,
                          env=ENV, cwd=ROOT)


def watchdog_pid(stdout: str) -> int:
    return int(re.search(r"`gradwatch serve` \(pid (\d+)\)", stdout).group(1))


def assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_main_command_tells_the_exploding_rnn_story_and_leaves_nothing_running(tmp_path):
    result = demo(tmp_path / "out", script=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    # the timeline: the guard, the alert, the notification, the command, its acknowledgement with the step
    assert "is above the guard's bound (median + 6σ of recent accepted steps" in out
    assert re.search(r"ALERT GradientSpikesHeld FIRING", out)
    assert "on-call receives [FIRING]" in out
    assert "remediation decided: enable_clipping" in out
    assert re.search(r"trainer acknowledged: applied at step \d+ \(global_norm clipping", out)
    # the side-by-side ending: protected finite and low, unprotected NaN
    table = dict(re.findall(r"^  (held-out loss at the end)\s+(\S+\s+\S+)$", out, re.M))
    protected, unprotected = table["held-out loss at the end"].split()
    assert float(protected) < 0.01 and unprotected == "nan"
    # the files it names
    picture = Path(re.search(r"^picture:\s+(\S+)", out, re.M).group(1))
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 50_000
    trace = json.loads((tmp_path / "out" / "trace.json").read_text())
    assert len(trace["steps"]) == 1200 and trace["layer_norms"] and trace["update_ratio"]
    assert any(what == "spike clipped" for _, what in trace["guard"])
    assert (tmp_path / "out" / "notifications.jsonl").read_text().count('"status": "firing"') >= 1
    assert_gone(watchdog_pid(out))


def test_nan_batch_is_skipped_and_notified(tmp_path):
    result = demo(tmp_path, "--scenario", "nan_batch")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"step 301 skipped: non-finite gradients, first in layer 'layers.0.weight'", result.stdout)
    assert "ALERT GradNonFinite FIRING" in result.stdout
    assert re.search(r"steps with a NaN/Inf loss\s+1 from step 301\s+300 from step 301", result.stdout)
    assert_gone(watchdog_pid(result.stdout))


def test_vanishing_is_notified_with_its_layers_but_not_remediated(tmp_path):
    result = demo(tmp_path, "--scenario", "vanishing", "--no-baseline")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "every duration divided by 60" in result.stdout
    assert re.search(r"ALERT VanishingGradients FIRING \(first_layer=layers.0.weight, last_layer=layers.38.weight", result.stdout)
    assert "remediation decided" not in result.stdout


def test_lr_too_high_gets_clipping_and_a_lower_learning_rate(tmp_path):
    result = demo(tmp_path, "--scenario", "lr_too_high", "--no-baseline")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"trainer acknowledged: applied at step \d+ \(global_norm clipping", result.stdout)
    assert re.search(r"applied lower_lr .*learning-rate scale now 0.5", result.stdout)


def test_keep_running_serves_metrics_and_api_until_interrupted(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "gradwatch.watchdog.cli", "demo", "--scenario", "nan_batch", "--no-baseline",
         "--keep-running", "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("Press Ctrl-C" in line for line in lines):
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
        text = "".join(lines)
        assert "Press Ctrl-C" in text, text[-3000:]
        metrics = re.search(r"curl (http://127.0.0.1:\d+/metrics)", text).group(1)
        assert 'gradwatch_skipped_steps_total{rank="0",reason="nonfinite",run="demo-nan_batch"} 1.0' in httpx.get(metrics).text
        alerts = re.search(r"curl '(http://127.0.0.1:\d+/api/v1/alerts\?run=[\w-]+)'", text).group(1)
        assert any(a["labels"]["alertname"] == "GradNonFinite" for a in httpx.get(alerts).json())
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert_gone(watchdog_pid(text))
    with pytest.raises(httpx.ConnectError):
        httpx.get(metrics)


def test_demo_rules_are_the_default_pack_with_its_clock_scaled(tmp_path):
    assert default_rules(1.0) == load_rules(None).rules
    scaled = {r.name: r for r in load_config(write_config(tmp_path / "c.yaml", "http://127.0.0.1:1/x", 60.0)).rules}
    for rule in load_rules(None).rules:
        fast = scaled[rule.name]
        assert fast.for_ == pytest.approx(rule.for_ / 60, abs=1e-3)
        assert getattr(fast, "window", 0) == pytest.approx(getattr(rule, "window", 0) / 60, abs=1e-3)
        assert [s.after.seconds for s in fast.on_fire] == pytest.approx([s.after.seconds / 60 for s in rule.on_fire], abs=1e-3)
        assert fast.model_copy(update={"for_": rule.for_}).labels == rule.labels  # thresholds, labels untouched
        assert getattr(fast, "factor", None) == getattr(rule, "factor", None)


def test_bad_scenario_is_refused_with_the_choices():
    result = subprocess.run([sys.executable, "-m", "gradwatch.watchdog.cli", "demo", "--scenario", "nope"],
                            capture_output=True, text=True, env=ENV)
    assert result.returncode == 2 and "exploding_rnn" in result.stderr
