"""The README's main command runs examples/quickstart.py: it must train, skip its poisoned batch and print its metrics."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_trains_and_prints_where_its_metrics_are():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "200"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "gradwatch metrics at http://127.0.0.1:" in result.stdout
    assert 'gradwatch_skipped_steps_total{rank="0",reason="nonfinite",run="quickstart"} 1.0' in result.stdout
