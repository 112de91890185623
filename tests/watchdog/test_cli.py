"""The command line as a user runs it: a subprocess, its output and its exit code."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources

from tests.integration.servers import free_port

GOOD = "rules:\n  - name: LossHigh\n    kind: threshold\n    metric: gradwatch_loss\n    op: above\n    value: 10\n"
BAD = "rules:\n  - name: LossHigh\n    kind: threshold\n    metric: gradwatch_loss\n    op: over\n    value: 10\n    for: soon\n"
SLACK_WITHOUT_URL = "notifiers:\n  - type: slack\n    channel: '#ml'\n"


def gradwatch(*args: str, cwd=None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gradwatch.watchdog.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def test_rules_check_accepts_a_good_file(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(GOOD)
    result = gradwatch("rules", "check", str(path))
    assert (result.returncode, result.stdout) == (0, f"{path}: ok (1 rules)\n")


def test_rules_check_accepts_the_shipped_default_pack():
    path = resources.files("gradwatch.watchdog.rules").joinpath("default.yaml")
    result = gradwatch("rules", "check", str(path))
    assert result.returncode == 0 and result.stdout.endswith(": ok (11 rules)\n")


def test_rules_check_prints_every_problem_with_file_line_location_and_reason(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(BAD)
    result = gradwatch("rules", "check", str(path))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{path}:5: rules[0].op: Input should be 'above' or 'below' (got 'over')",
        f"{path}:7: rules[0].for: invalid duration 'soon': use a Prometheus duration like 30s, 5m, 1h30m or 0",
    ]


def test_rules_check_checks_notifiers_and_every_file_given(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "slack.yaml"
    good.write_text(GOOD + "notifiers:\n  - type: webhook\n    url: http://127.0.0.1:9/hook\n")
    bad.write_text(SLACK_WITHOUT_URL)
    result = gradwatch("rules", "check", str(good), str(bad), str(tmp_path / "missing.yaml"))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0] == f"{good}: ok (1 rules, 1 notifier)"
    assert lines[1].startswith(f"{bad}:2: notifiers[0]: slack notifier 'slack' has no url")
    assert lines[2].startswith(f"{tmp_path / 'missing.yaml'}: <file>: cannot read")


def test_serve_refuses_a_bad_config_before_binding_or_opening_anything(tmp_path):
    config = tmp_path / "gradwatch.yaml"
    config.write_text(SLACK_WITHOUT_URL)
    port = free_port()
    result = gradwatch("serve", "--config", str(config), "--port", str(port), "--db", "state.db", cwd=tmp_path)
    assert result.returncode == 2
    assert f"refusing to start, 1 problem in {config}" in result.stderr
    assert f"{config}:2: notifiers[0]: slack notifier 'slack' has no url" in result.stderr
    assert not (tmp_path / "state.db").exists()


def test_serve_refuses_a_bad_setting(tmp_path):
    result = gradwatch("serve", "--scrape-interval", "often", cwd=tmp_path)
    assert result.returncode == 2 and "scrape_interval" in result.stderr and "not a duration" in result.stderr


def test_the_cli_module_imports_nothing_heavy():
    code = (
        "import sys, gradwatch.watchdog.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'fastapi', 'uvicorn', 'httpx', 'pydantic'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "[]"


def test_help_lists_the_subcommands():
    result = gradwatch("--help")
    assert result.returncode == 0 and "serve" in result.stdout and "rules" in result.stdout
