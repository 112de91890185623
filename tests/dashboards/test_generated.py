"""The committed dashboards are exactly what the generator produces, and they are well-formed:
unique ids, every query on the template data source, only metric names from the contract."""

import re
import subprocess
import sys

import pytest

pytest.importorskip("grafana_foundation_sdk", reason="needs the dashboards extra: pip install 'gradwatch[dashboards]'")

from gradwatch.watchdog import metric_names as m  # noqa: E402
from gradwatch.watchdog.dashboards.render import DASHBOARDS, render_all, stale_files, write_all  # noqa: E402
from tests.dashboards.dashboard_json import (  # noqa: E402
    DASHBOARDS_DIR,
    FILES,
    annotation_queries,
    load,
    panel_queries,
    panels,
    variable_queries,
)

CONTRACT = {value for name, value in vars(m).items() if name.isupper() and isinstance(value, str)
            and value.startswith(m.PREFIX)}
METRIC = re.compile(r"\bgradwatch_[a-z_]+\b")


def test_committed_json_is_what_the_generator_produces():
    assert set(DASHBOARDS) == set(FILES)
    generated = render_all()
    for name in FILES:
        committed = (DASHBOARDS_DIR / name).read_text(encoding="utf-8")
        assert committed == generated[name], (
            f"dashboards/{name} differs from the generator: run `gradwatch dashboards generate` and commit the result"
        )


def test_stale_files_names_a_changed_or_missing_dashboard(tmp_path):
    write_all(tmp_path)
    assert stale_files(tmp_path) == []
    (tmp_path / FILES[0]).write_text("{}\n")
    (tmp_path / FILES[1]).unlink()
    assert stale_files(tmp_path) == list(FILES)


def test_the_generator_is_deterministic():
    assert render_all() == render_all()


@pytest.mark.parametrize("name", FILES)
def test_panels_have_unique_ids_and_titles_and_use_the_datasource_variable(name):
    board = load(name)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    titles = [panel["title"] for panel in board["panels"]]
    assert len(titles) == len(set(titles))
    for panel in panels(board):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"


@pytest.mark.parametrize("name", FILES)
def test_queries_use_only_contract_metric_names_and_filter_on_run_and_rank(name):
    board = load(name)
    exprs = [expr for _, _, expr in panel_queries(board)] + [expr for _, expr, _ in annotation_queries(board)]
    for expr in exprs:
        unknown = set(METRIC.findall(expr)) - CONTRACT
        assert not unknown, f"{expr}: not in metric_names: {unknown}"
        for selector in re.findall(r"gradwatch_[a-z_]+\{[^}]*\}", expr):
            assert 'run=~"$run"' in selector and 'rank=~"$rank"' in selector, selector
    for _, selector, label in variable_queries(board):
        assert set(METRIC.findall(selector)) <= CONTRACT
        assert label in (m.LABEL_RUN, m.LABEL_RANK, m.LABEL_LAYER)


def test_the_views_the_issue_asks_for_are_there():
    overview, layers = load(FILES[0]), load(FILES[1])
    titles = {panel["title"]: panel for panel in panels(overview)}
    for wanted in ("Global gradient norm", "Loss", "Effective learning rate", "LR scale (remediation)",
                   "Skipped steps", "Non-finite gradient elements", "Clipping state", "Clip threshold",
                   "Commands applied"):
        assert wanted in titles
    assert any(m.GRAD_GLOBAL_NORM_MAX in q["expr"] for q in titles["Global gradient norm"]["targets"])
    assert [name for name, _, _ in annotation_queries(overview)] == ["Commands applied"]
    assert m.COMMANDS_APPLIED_TOTAL in next(annotation_queries(overview))[1]

    by_title = {panel["title"]: panel for panel in panels(layers)}
    norms = by_title["Gradient L2 norm per layer"]
    assert norms["fieldConfig"]["defaults"]["custom"]["scaleDistribution"] == {"type": "log", "log": 10}
    heat = next(panel for panel in panels(layers) if panel["type"] == "heatmap")
    assert heat["options"]["calculate"] is False
    assert m.LAYER_DEPTH in heat["targets"][0]["expr"] and heat["targets"][0]["legendFormat"].startswith("{{depth}}")
    ratio = by_title["log10 update ratio per layer"]["fieldConfig"]["defaults"]
    assert [step["value"] for step in ratio["thresholds"]["steps"]] == [None, -4, -2]
    assert ratio["custom"]["thresholdsStyle"]["mode"] != "off"
    assert "Parameter L2 norm per layer" in by_title
    assert {v["name"] for v in layers["templating"]["list"]} == {"datasource", "run", "rank", "layer"}
    assert {v["name"] for v in overview["templating"]["list"]} == {"datasource", "run", "rank"}


def test_the_dashboards_package_never_imports_torch():
    """It ships with the watchdog, which deploys without torch."""
    code = ("import sys, gradwatch.watchdog.dashboards.render, gradwatch.watchdog.dashboards.push, "
            "gradwatch.watchdog.dashboards.commands; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
