"""The benchmark commands the README and benchmarks/README.md give run and print their tables.

Tiny settings: these check that the commands work, never how fast anything is (timings
belong to the benchmarks themselves, run by hand; their last tables are in the READMEs).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.integration
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def bench(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                            timeout=300, cwd=BENCHMARKS.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_agent_overhead_prints_ratios_and_goals():
    out = bench("agent_overhead.py", "--steps", "20", "--models", "0", "--variants", "default,guard,naive", "--no-wandb")
    assert "agent (default)" in out and "guard only" in out and "naive .item() loop" in out
    assert "Summary: ratio to `none`" in out


def test_watchdog_throughput_prints_its_rounds():
    out = bench("watchdog_throughput.py", "--quick", "--runs", "3", "--rounds", "2")
    assert "series×rules/s" in out and "steady" in out


def test_command_latency_prints_each_stage():
    out = bench("command_latency.py", "--repeats", "1", "--interval", "0.5")
    for stage in ("bad step → alert firing", "decided → fetched by the agent's poll", "bad step → applied"):
        assert stage in out


def test_remediation_quality_runs_its_cases_in_the_closed_loop():
    out = bench("remediation_quality.py", "--quick")
    for case in ("lr_warmup", "corrupted_batch", "explosion_early"):
        assert case in out
    for goal in ("healthy runs with a lasting remediation", "pathologies alerted", "median onset -> held gradient"):
        assert goal in out


def test_adapter_overhead_prints_both_frameworks_ratios():
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    out = bench("adapter_overhead.py", "--quick", "--steps", "8")
    assert "ratio to the framework's own grad-norm logging" in out
    assert "lightning    gradwatch" in out and "huggingface  gradwatch" in out


def test_snapshot_cost_prints_bytes_and_the_ratio_to_a_step():
    out = bench("snapshot_cost.py", "--sizes", "0.05", "--rounds", "1", "--batch", "8")
    assert "snapshot bytes" in out and "snapshot / step" in out and "0.05 M" in out
