"""The Kubernetes manifests in deploy/kubernetes, validated offline (no cluster can run here).

- core kinds (Namespace, Secret, ConfigMap, PVC, Deployment, Service, the example Job)
  against the Kubernetes OpenAPI schemas shipped by kubernetes-validate, strict mode
  (unknown fields refused), for the oldest and newest Kubernetes versions it knows that
  we support;
- prometheus-operator kinds (PodMonitor, PrometheusRule, AlertmanagerConfig) against the
  typed models of cloudcoil-models-prometheus-operator (generated from the CRDs); a
  round trip must give the manifest back, so a misspelt field fails too;
- the PrometheusRule's spec with ``promtool check rules``; the alertmanager.yaml route
  snippet with ``amtool check-config``; the watchdog's ConfigMap with gradwatch's own
  config loader;
- the wiring between them: names, ports, labels, secret keys, paths.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import pytest
import yaml

from gradwatch.watchdog.settings import DEFAULT_PORT
from tests.integration.servers import require_binary

kubernetes_validate = pytest.importorskip("kubernetes_validate")

KUBE = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
CORE_KINDS = {"Namespace", "Secret", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "Job"}
OPERATOR_KINDS = {"PodMonitor", "PrometheusRule", "AlertmanagerConfig"}
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())


@functools.cache
def manifests() -> tuple[tuple[str, dict], ...]:
    """(file name, resource) for every Kubernetes resource under deploy/kubernetes (read once; do not mutate)."""
    found = []
    for path in sorted(KUBE.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc and "kind" in doc and doc["kind"] != "Kustomization":
                found.append((str(path.relative_to(KUBE)), doc))
    return tuple(found)


def one(kind: str, name: str | None = None) -> dict:
    matches = [doc for _, doc in manifests() if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert len(matches) == 1, f"{kind} {name}: {len(matches)} found"
    return matches[0]


def env(container: dict) -> dict:
    return {item["name"]: item for item in container["env"]}


def test_every_kind_is_known():
    kinds = {doc["kind"] for _, doc in manifests()}
    assert kinds == CORE_KINDS | OPERATOR_KINDS


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name,doc", [m for m in manifests() if m[1]["kind"] in CORE_KINDS],
                         ids=[f"{m[0]}:{m[1]['kind']}" for m in manifests() if m[1]["kind"] in CORE_KINDS])
def test_core_kinds_validate_against_the_kubernetes_schema(name, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_catches_a_misspelt_field():
    deployment = yaml.safe_load((KUBE / "deployment.yaml").read_text())
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    top_level = {name for name, _ in manifests() if "/" not in name}
    assert listed == top_level
    assert kustomization["namespace"] == one("Namespace")["metadata"]["name"]


@pytest.mark.parametrize("kind", sorted(OPERATOR_KINDS))
def test_operator_kinds_match_the_crd_models(kind):
    version = "v1alpha1" if kind == "AlertmanagerConfig" else "v1"
    models = pytest.importorskip(f"cloudcoil.models.prometheus_operator.{version}",
                                 reason="needs cloudcoil-models-prometheus-operator (prometheus-operator CRD models)")
    doc = one(kind)
    parsed = getattr(models, kind).model_validate(doc)
    assert parsed.model_dump(mode="json", by_alias=True, exclude_unset=True) == doc, (
        f"{kind}: a field the CRD does not know (misspelt?) was dropped"
    )


def test_prometheus_rule_spec_passes_promtool(tmp_path):
    promtool = require_binary("promtool")
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(one("PrometheusRule")["spec"]))
    done = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_alertmanager_route_snippet_passes_amtool():
    amtool = require_binary("amtool")
    done = subprocess.run([amtool, "check-config", str(KUBE / "alertmanager-route.yaml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load((KUBE / "alertmanager-route.yaml").read_text())
    (webhook,) = next(r for r in config["receivers"] if r["name"] == "gradwatch-watchdog")["webhook_configs"]
    assert webhook["url"].endswith(f":{DEFAULT_PORT}/api/v1/alertmanager")
    assert webhook["http_config"]["authorization"]["type"] == "Bearer"


def test_watchdog_config_map_is_a_valid_gradwatch_config(tmp_path):
    from gradwatch.watchdog.config_file import load_config

    deployment = one("Deployment", "gradwatch-watchdog")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    config_path = Path(env(container)["GRADWATCH_CONFIG"]["value"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    config_map = one("ConfigMap", volume["configMap"]["name"])
    text = config_map["data"][config_path.name]
    (tmp_path / "gradwatch.yaml").write_text(text)
    config = load_config(tmp_path / "gradwatch.yaml")
    assert config.rules


def test_watchdog_deployment_is_wired_to_its_secret_service_and_state():
    deployment = one("Deployment", "gradwatch-watchdog")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    variables = env(container)
    secret = one("Secret", variables["GRADWATCH_SECRET"]["valueFrom"]["secretKeyRef"]["name"])
    assert variables["GRADWATCH_SECRET"]["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]
    assert variables["GRADWATCH_HOST"]["value"] == "0.0.0.0"
    port = next(p for p in container["ports"] if p["name"] == "http")
    assert port["containerPort"] == int(variables["GRADWATCH_PORT"]["value"]) == DEFAULT_PORT
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False

    db_dir = str(Path(variables["GRADWATCH_DB"]["value"]).parent)
    data = next(m for m in container["volumeMounts"] if m["mountPath"] == db_dir)
    claim = next(v for v in pod["volumes"] if v["name"] == data["name"])["persistentVolumeClaim"]["claimName"]
    one("PersistentVolumeClaim", claim)
    assert deployment["spec"]["strategy"]["type"] == "Recreate"

    service = one("Service", "gradwatch-watchdog")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == DEFAULT_PORT and service["spec"]["ports"][0]["targetPort"] == "http"


def test_alertmanager_config_posts_to_the_watchdog_with_the_shared_secret():
    namespace = one("Namespace")["metadata"]["name"]
    service = one("Service", "gradwatch-watchdog")["metadata"]["name"]
    config = one("AlertmanagerConfig")["spec"]
    assert config["route"]["receiver"] == config["receivers"][0]["name"]
    (webhook,) = config["receivers"][0]["webhookConfigs"]
    assert webhook["url"] == f"http://{service}.{namespace}.svc:{DEFAULT_PORT}/api/v1/alertmanager"
    auth = webhook["httpConfig"]["authorization"]
    assert auth["type"] == "Bearer"
    secret = one("Secret", auth["credentials"]["name"])
    assert auth["credentials"]["key"] in secret["stringData"]


def test_pod_monitor_selects_the_example_training_pods_on_the_gradwatch_port():
    monitor = one("PodMonitor")["spec"]
    job = one("Job")["spec"]["template"]
    assert monitor["selector"]["matchLabels"].items() <= job["metadata"]["labels"].items()
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] == "gradwatch" and endpoint["path"] == "/metrics"
    (container,) = job["spec"]["containers"]
    assert any(port["name"] == "gradwatch" for port in container["ports"])
    variables = env(container)
    assert variables["GRADWATCH_URL"]["value"].endswith(f":{DEFAULT_PORT}")
    assert variables["GRADWATCH_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "gradwatch-secret"


def test_dashboard_config_map_is_labelled_for_grafanas_sidecar():
    config_map = one("ConfigMap", "gradwatch-dashboards")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(config_map["data"]) == {"gradwatch-overview.json", "gradwatch-layers.json"}
