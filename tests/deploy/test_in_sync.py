"""The deploy files copied from another source of truth match it (deploy/regenerate.py writes them):
the dashboard ConfigMap (dashboards/*.json), the watchdog's config ConfigMap (the default
rule pack), the PrometheusRule (deploy/prometheus/gradwatch.rules.yml) — and that rule file
matches `gradwatch rules export --format prometheus` once that subcommand exists."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _regenerate():
    spec = importlib.util.spec_from_file_location("deploy_regenerate", ROOT / "deploy" / "regenerate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


regenerate = _regenerate()


def test_generated_kubernetes_files_are_in_sync():
    stale = regenerate.stale(regenerate.outputs())
    assert not stale, f"out of date: {[str(p.relative_to(ROOT)) for p in stale]} — run python deploy/regenerate.py"


def test_a_changed_dashboard_makes_the_config_map_stale(tmp_path, monkeypatch):
    files = regenerate.outputs()
    config_map = ROOT / "deploy" / "kubernetes" / "configmap-dashboards.yaml"
    copy = tmp_path / "configmap-dashboards.yaml"
    copy.write_text(files[config_map].replace('"title": "gradwatch', '"title": "changed'))
    assert regenerate.stale({copy: files[config_map]}) == [copy]


def test_rule_file_matches_the_rule_export():
    exported = regenerate.exported_rules()
    if exported is None:
        pytest.skip("`gradwatch rules export` does not exist in this checkout")
    assert regenerate.RULES_FILE.read_text(encoding="utf-8") == exported, "run python deploy/regenerate.py"
