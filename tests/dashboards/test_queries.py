"""Every query of the committed dashboards returns data from a real Prometheus that scraped a real agent.

A small MLP trains for a few seconds with the agent attached (every step measured,
update ratios included); one batch's gradient is poisoned with NaN so the guard's
counters exist, and a stand-in watchdog (tests/agent/fake_watchdog.py, speaking the
real signed wire schema) sends ``lower_lr`` and ``enable_clipping``, which the agent
applies through its real command path — so the commands counter, the LR scale and
the clip threshold move. A real Prometheus scrapes the agent every second. Then each
panel query, annotation query and template variable query of ``dashboards/*.json`` —
with the template variables substituted as Grafana would (one run, rank 0, layer =
All) — goes through Prometheus's HTTP API and must answer ``success`` with data.

In production some panels are legitimately empty, and say so in their description:
skipped steps and non-finite gradients (until the first NaN/Inf), commands applied and
its annotation (until the watchdog's first command), the clip threshold (until clipping
was enabled once), the update ratio (until the agent's first ``detail_every`` step),
loss (if the loop never calls ``observe``). This test makes all of them non-empty.
"""

from __future__ import annotations

import math
import re
import time

import httpx
import pytest

torch = pytest.importorskip("torch")

import gradwatch.agent  # noqa: E402
from gradwatch.watchdog import metric_names as m  # noqa: E402
from tests.agent.fake_watchdog import FakeWatchdog  # noqa: E402
from tests.dashboards.dashboard_json import FILES, annotation_queries, load, panel_queries, variable_queries  # noqa: E402
from tests.integration.servers import PROMETHEUS_BIN, require_binary, start_prometheus  # noqa: E402

pytestmark = pytest.mark.integration

RUN = "dash-test"
SECRET = b"dashboards-test-secret"
SCRAPE_S = 1
# What Grafana would substitute: one run, rank 0, every layer, and $__rate_interval =
# max($__interval + scrape interval, 4 x scrape interval) with a 1 s scrape interval.
VARIABLES = {"$__rate_interval": f"{4 * SCRAPE_S}s", "$run": RUN, "$rank": "0", "$layer": ".*"}

PROMETHEUS_YML = """
global:
  scrape_interval: {scrape}s
  evaluation_interval: {scrape}s
scrape_configs:
  - job_name: gradwatch
    static_configs:
      - targets: ["{target}"]
"""


def substitute(expr: str) -> str:
    # Longest names first, so $__rate_interval is not read as $__rate + "_interval".
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


class Scraped:
    """The Prometheus that watched the training, and the time range it covers."""

    def __init__(self, url: str, start: float, end: float, layers: list[str]) -> None:
        self.url, self.start, self.end, self.layers = url, start, end, layers
        self.nan_times: list[float] = []

    def get(self, path: str, **params) -> dict:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query_range(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query_range", query=expr, start=self.start, end=self.end, step=SCRAPE_S)["result"]

    def has(self, expr: str) -> bool:
        return bool(self.get("/api/v1/query", query=expr, time=time.time())["result"])


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    )


def _train(agent, model, optimizer, watchdog, prometheus_has) -> list[float]:
    """~8 s of paced steps: a NaN batch at 2 s, commands at 3 s and 4 s, a second NaN batch at 5 s.

    Returns the wall-clock times of the two NaN batches.
    """
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 8, generator=gen), torch.randn(256, 1, generator=gen)
    begin = time.monotonic()
    events = {2.0: "nan", 3.0: "lower_lr", 4.0: "clip", 5.0: "nan"}
    nan_times = []
    while time.monotonic() - begin < 8.0:
        elapsed = time.monotonic() - begin
        due = [at for at in events if at <= elapsed]
        batch = torch.randint(0, 256, (32,), generator=gen)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
        loss.backward()
        for at in due:
            event = events.pop(at)
            if event == "nan":
                model[0].weight.grad[0, 0] = math.nan
                nan_times.append(time.time())
            elif event == "lower_lr":
                watchdog.send(RUN, {"action": "lower_lr", "factor": 0.5})
            else:
                watchdog.send(RUN, {"action": "enable_clipping", "mode": "global_norm", "threshold": 1.0})
        agent.observe(loss=loss)
        optimizer.step()
        time.sleep(0.02)
    # The last events must have reached Prometheus before the queries run.
    deadline = time.monotonic() + 15
    wanted = [f'{m.COMMANDS_APPLIED_TOTAL}{{action="enable_clipping"}}', m.CLIP_THRESHOLD,
              f"{m.SKIPPED_STEPS_TOTAL} >= 2"]
    while not all(prometheus_has(expr) for expr in wanted):
        assert time.monotonic() < deadline, f"Prometheus never saw all of {wanted}"
        time.sleep(0.2)
    time.sleep(2 * SCRAPE_S)
    return nan_times


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    require_binary(PROMETHEUS_BIN)  # skip before anything is started
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("dashboards")
    secret_file = tmp / "secret"
    secret_file.write_bytes(SECRET)
    watchdog = FakeWatchdog(SECRET)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    agent = gradwatch.agent.watch(
        model, optimizer, run=RUN, port=0, every=1, detail_every=1,
        watchdog_url=watchdog.url, secret_file=str(secret_file), poll_interval_s=0.05,
    )
    target = agent.url.removeprefix("http://").removesuffix("/metrics")
    prometheus = None
    try:
        prometheus = start_prometheus(PROMETHEUS_YML.format(scrape=SCRAPE_S, target=target), tmp)
        view = Scraped(prometheus.url, 0, 0, [name for name, _ in model.named_parameters()])
        # Prometheus applies its scrape config a few seconds after it is ready (the
        # discovery manager batches updates every 5 s): train once it scrapes.
        deadline = time.monotonic() + 20
        while not view.has('up{job="gradwatch"} == 1'):
            assert time.monotonic() < deadline, f"Prometheus never scraped the agent:\n{prometheus.log_tail()}"
            time.sleep(0.2)
        view.start = time.time()
        view.nan_times = _train(agent, model, optimizer, watchdog, view.has)
        view.end = time.time()
        assert [a.status for a in watchdog.acks] == ["applied", "applied"], watchdog.acks
        yield view
    finally:
        if prometheus is not None:
            prometheus.stop()
        agent.close()
        watchdog.close()


QUERIES = [(name, title, ref, expr) for name in FILES for title, ref, expr in panel_queries(load(name))]


@pytest.mark.parametrize("name,title,ref,expr", QUERIES, ids=[f"{q[0]}:{q[1]}:{q[2]}" for q in QUERIES])
def test_panel_query_returns_data(scraped, name, title, ref, expr):
    result = scraped.query_range(substitute(expr))
    assert result, f"{name} / {title} / {ref}: no data for {substitute(expr)}"
    assert any(len(series["values"]) for series in result)


def test_commands_annotation_marks_the_applied_commands(scraped):
    (_, expr, step), = annotation_queries(load("gradwatch-overview.json"))
    assert step
    result = scraped.query_range(substitute(expr))
    assert {series["metric"]["action"] for series in result} == {"lower_lr", "enable_clipping"}


@pytest.mark.parametrize("name", FILES)
def test_template_variables_list_the_run_its_rank_and_its_layers(scraped, name):
    expected = {"run": [RUN], "rank": ["0"], "layer": scraped.layers}
    for variable, selector, label in variable_queries(load(name)):
        values = scraped.get(f"/api/v1/label/{label}/values", **{"match[]": substitute(selector)},
                             start=scraped.start, end=scraped.end)
        assert sorted(values) == sorted(expected[variable]), f"{name}: ${variable}"


def test_skipped_steps_panel_shows_the_first_nan_batch(scraped):
    """The skip counter is exported at 0 from the start, so the first NaN batch shows as an increase."""
    panel_expr = next(expr for title, _, expr in panel_queries(load("gradwatch-overview.json")) if title == "Skipped steps")
    (series,) = [s for s in scraped.query_range(substitute(panel_expr)) if s["metric"]["reason"] == "nonfinite"]
    first_nan, second_nan = scraped.nan_times

    def first_nonzero(result) -> float:
        return min(float(t) for s in result for t, v in s["values"] if float(v) > 0)

    assert first_nonzero([series]) < second_nan  # the first event shows before the second happens
    increase_only = f'increase({m.SKIPPED_STEPS_TOTAL}{{run="{RUN}",reason="nonfinite"}}[{VARIABLES["$__rate_interval"]}])'
    assert first_nonzero(scraped.query_range(increase_only)) < second_nan  # plain increase() sees it too
    counts = [float(v) for _, v in series["values"]]
    assert counts[-1] == 0  # events per interval, not a running total


def test_heatmap_rows_follow_model_depth(scraped):
    """Row names start with the layer's depth, so Grafana's numeric sort puts them in model order."""
    heat = next(expr for title, _, expr in panel_queries(load("gradwatch-layers.json")) if title.startswith("log10 mean"))
    result = scraped.query_range(substitute(heat))
    depth = {series["metric"]["layer"]: int(series["metric"]["depth"]) for series in result}
    assert [layer for layer, _ in sorted(depth.items(), key=lambda item: item[1])] == scraped.layers
    assert all(set(series["metric"]) == {"depth", "layer"} for series in result)
    values = [float(v) for series in result for _, v in series["values"] if math.isfinite(float(v))]
    assert values and all(v < 1 for v in values)  # log10 of mean |g|, not the raw value


def test_update_ratio_band_panel_is_in_log10_units(scraped):
    ratio = next(expr for title, _, expr in panel_queries(load("gradwatch-layers.json")) if title.startswith("log10 update"))
    raw = {
        (series["metric"]["layer"], t): float(v)
        for series in scraped.query_range(substitute(f'{m.UPDATE_RATIO}{{run=~"$run"}}'))
        for t, v in series["values"]
    }
    shown = [
        (float(v), raw[series["metric"]["layer"], t])
        for series in scraped.query_range(substitute(ratio))
        for t, v in series["values"]
    ]
    # Each point is log10 of the exported ratio (a bias near zero may sit far from the usual -3:
    # the band's units, not its values, are what this checks).
    assert len(shown) >= 5 and len(shown) == len(raw)
    assert all(v == pytest.approx(math.log10(r), abs=1e-9) for v, r in shown if r > 0)


def test_substitute_refuses_an_unknown_variable():
    with pytest.raises(AssertionError):
        substitute('gradwatch_step{run=~"$unknown"}')
    assert re.fullmatch(r'gradwatch_step\{run=~"dash-test"\}\[4s\]', substitute('gradwatch_step{run=~"$run"}[$__rate_interval]'))
