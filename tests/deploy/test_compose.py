"""The compose stack in deploy/compose, checked offline (no Docker engine runs here).

Its Prometheus config goes through ``promtool check config`` (with the rule file it
mounts), its Alertmanager config through ``amtool check-config``; the compose file's
structure is checked against the files it references and the wiring between services:
bind mounts that exist, declared named volumes, ports bound to 127.0.0.1 (a development
setup), scrape targets, webhook and data source URLs that name real services and ports,
one shared secret.
"""

from __future__ import annotations

import os
import py_compile
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gradwatch.watchdog.settings import DEFAULT_PORT
from tests.integration.servers import require_binary

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
RULES = ROOT / "deploy" / "prometheus" / "gradwatch.rules.yml"
SERVICES = {"trainer", "watchdog", "prometheus", "alertmanager", "grafana"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())  # merges the x-secret anchor


def bind_mounts(service: dict) -> list[tuple[str, str]]:
    """(host path, container path) of the service's bind mounts (sources that look like paths)."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def container_path(service: dict, host_path: Path) -> str:
    for source, target in bind_mounts(service):
        if (COMPOSE_DIR / source).resolve() == host_path.resolve():
            return target
    raise AssertionError(f"{host_path} is not mounted")


def test_the_stack_has_every_service(compose):
    assert set(compose["services"]) == SERVICES


def test_bind_mounts_exist_and_named_volumes_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source} does not exist"
                assert volume.endswith(":ro"), f"{name}: mount configs read-only: {volume}"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_ports_are_bound_to_loopback(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} would listen on every interface"


def test_images_are_pinned_and_builds_exist(compose):
    for name, service in compose["services"].items():
        if "image" in service:
            assert re.search(r":v?\d+\.\d+\.\d+$", service["image"]), f"{name}: pin {service['image']}"
        else:
            context = (COMPOSE_DIR / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name
        for dependency in service.get("depends_on", {}):
            assert dependency in compose["services"], f"{name} depends on unknown {dependency}"


def test_one_secret_is_shared_by_trainer_watchdog_and_alertmanager(compose):
    values = {compose["services"][name]["environment"]["GRADWATCH_SECRET"] for name in ("trainer", "watchdog", "alertmanager")}
    assert len(values) == 1 and next(iter(values)).startswith("${GRADWATCH_SECRET")
    alertmanager = yaml.safe_load((COMPOSE_DIR / "alertmanager.yml").read_text())
    credentials = alertmanager["receivers"][0]["webhook_configs"][0]["http_config"]["authorization"]["credentials_file"]
    assert credentials in " ".join(compose["services"]["alertmanager"]["entrypoint"])


def test_trainer_registers_with_the_watchdog_and_is_scraped(compose):
    trainer = compose["services"]["trainer"]["environment"]
    assert trainer["GRADWATCH_URL"] == f"http://watchdog:{DEFAULT_PORT}"
    assert trainer["GRADWATCH_METRICS_HOST"] == "0.0.0.0"
    prometheus = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert targets == {f"trainer:{trainer['GRADWATCH_METRICS_PORT']}", f"watchdog:{DEFAULT_PORT}"}
    (alertmanagers,) = prometheus["alerting"]["alertmanagers"]
    assert alertmanagers["static_configs"][0]["targets"] == ["alertmanager:9093"]
    assert compose["services"]["watchdog"]["environment"]["GRADWATCH_PROMETHEUS_URL"] == "http://prometheus:9090"


def test_prometheus_config_and_the_rules_it_mounts_pass_promtool(compose, tmp_path):
    promtool = require_binary("promtool")
    rules_dir = container_path(compose["services"]["prometheus"], RULES).rsplit("/", 1)[0]
    config = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    assert config["rule_files"] == [f"{rules_dir}/*.yml"]
    # The same config with the rule glob pointing at the repository's rule file, so promtool checks it too.
    config["rule_files"] = [str(RULES)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    done = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"SUCCESS: [1-9]\d* rules found", done.stdout), done.stdout


def test_alertmanager_config_passes_amtool_and_posts_to_the_watchdog():
    amtool = require_binary("amtool")
    done = subprocess.run([amtool, "check-config", str(COMPOSE_DIR / "alertmanager.yml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load((COMPOSE_DIR / "alertmanager.yml").read_text())
    assert config["route"]["receiver"] == "gradwatch-watchdog"
    (webhook,) = config["receivers"][0]["webhook_configs"]
    assert webhook["url"] == f"http://watchdog:{DEFAULT_PORT}/api/v1/alertmanager"
    assert webhook["send_resolved"] is True
    assert webhook["http_config"]["authorization"]["type"] == "Bearer"


def test_grafana_provisions_prometheus_and_the_committed_dashboards(compose):
    grafana = compose["services"]["grafana"]
    provisioning = container_path(grafana, COMPOSE_DIR / "grafana" / "provisioning")
    assert provisioning == "/etc/grafana/provisioning"
    datasources = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    providers = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/dashboards/gradwatch.yaml").read_text())
    (provider,) = providers["providers"]
    assert provider["options"]["path"] == container_path(grafana, ROOT / "dashboards")
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/gradwatch-overview.json"
    assert (ROOT / "dashboards" / "gradwatch-overview.json").is_file()


def test_example_trainer_script_compiles_and_reads_the_settings_compose_gives_it(compose):
    script = COMPOSE_DIR / "trainer" / "train.py"
    py_compile.compile(str(script), doraise=True)
    text = script.read_text()
    for variable in compose["services"]["trainer"]["environment"]:
        if variable not in ("GRADWATCH_URL", "GRADWATCH_SECRET"):  # read by the agent itself
            assert variable in text, f"train.py ignores {variable}"


def test_example_trainer_runs_with_the_agent():
    """A short real run (no watchdog, ephemeral port): healthy steps, then the deliberate divergence."""
    pytest.importorskip("torch")
    environment = {**os.environ, "STEPS": "120", "EXPLODE_AT": "60", "GRADWATCH_METRICS_PORT": "0"}
    environment.pop("GRADWATCH_URL", None)
    done = subprocess.run([sys.executable, str(COMPOSE_DIR / "trainer" / "train.py")], env=environment,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "metrics at http://127.0.0.1:" in done.stderr
    assert "a deliberate divergence" in done.stderr
