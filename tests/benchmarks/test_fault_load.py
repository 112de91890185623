"""`benchmarks/fault_load.py --quick` runs every fault scenario present and prints one table (no timings judged)."""

from __future__ import annotations

import pytest

from tests.benchmarks.test_commands import bench

pytestmark = pytest.mark.integration


def test_fault_load_quick_prints_one_table_and_names_what_is_missing():
    out = bench("fault_load.py", "--quick", "--only", "store,not_a_scenario")
    assert "acknowledged commands lost" in out and "duplicate notifications" in out
    assert "audit rows added" in out and "audit growth" in out
    assert "not present, skipped: not_a_scenario" in out
