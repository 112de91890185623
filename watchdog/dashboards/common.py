"""What both dashboards share: the data source, the template variables, PromQL helpers and panel defaults.

Every query filters on the template variables through :func:`select`, so a panel
never shows another run's series. Queries use only the names in
:mod:`gradwatch.watchdog.metric_names`.
"""

from __future__ import annotations

from gradwatch.watchdog import metric_names as m
from gradwatch.watchdog.dashboards.sdk import common, common_builders, dash, model, prometheus, timeseries

TAG = "gradwatch"
DATASOURCE_VARIABLE = "datasource"
DATASOURCE = common.DataSourceRef(type_val="prometheus", uid="${%s}" % DATASOURCE_VARIABLE)

# Grafana's own interval variables (substituted by Grafana, and by the query test).
RATE_INTERVAL = "$__rate_interval"

LOG10 = common_builders.ScaleDistributionConfig().type(common.ScaleDistribution.LOG).log(10)
DASHED = {"fill": "dash", "dash": [10, 10]}


def select(metric: str, *, layer: bool = False, **matchers: str) -> str:
    """``metric{run=~"$run", rank=~"$rank"[, layer=~"$layer"], ...}`` — the dashboards' filter."""
    labels = [f'{m.LABEL_RUN}=~"$run"', f'{m.LABEL_RANK}=~"$rank"']
    if layer:
        labels.append(f'{m.LABEL_LAYER}=~"$layer"')
    labels += [f'{name}="{value}"' for name, value in matchers.items()]
    return f"{metric}{{{', '.join(labels)}}}"


def events(counter: str, window: str) -> str:
    """Events counted by ``counter`` in each ``window``, including the first ones.

    The agent creates a counter's series (e.g. ``reason="nonfinite"``) when its first
    event happens, already at 1 or more. ``increase()`` needs two samples of a series,
    so alone it would never show that first event: a series that did not exist
    ``window`` ago counts its whole value instead (it was 0 before it appeared).
    Set operators match label sets ignoring the metric name, so no series counts twice.
    A counter Prometheus sees for the first time (a new scrape target, an agent that
    was already running) counts its whole value once, in the first window.
    """
    return f"({counter} unless {counter} offset {window}) or increase({counter}[{window}])"


def target(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref)


def series_panel(title: str, description: str, *targets: prometheus.Dataquery, unit: str = "none",
                 log: bool = False, width: int = 12, height: int = 8) -> timeseries.Panel:
    """A time series panel on the dashboards' data source with a legend below."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(list(targets))
        .unit(unit)
        .span(width)
        .height(height)
        .line_width(1)
        .fill_opacity(0)
        .show_points(common.VisibilityMode.NEVER)
        .span_nulls(False)
        .legend(
            common_builders.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
        )
        .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING))
    )
    if log:
        panel = panel.scale_distribution(LOG10)
    return panel


def dashed(panel: timeseries.Panel, ref: str) -> timeseries.Panel:
    """Draw query ``ref`` dashed (a bound or a peak next to the value itself)."""
    return panel.override_by_query(ref, [model.DynamicConfigValue(id_val="custom.lineStyle", value=DASHED)])


def datasource_variable() -> dash.DatasourceVariable:
    return dash.DatasourceVariable(DATASOURCE_VARIABLE).label("Prometheus").type("prometheus")


def query_variable(name: str, query: str, *, multi: bool, sort: model.VariableSort) -> dash.QueryVariable:
    """A ``label_values(...)`` variable, refreshed with the time range; ``multi`` adds "All" as ``.*``."""
    variable = (
        dash.QueryVariable(name)
        .label(name)
        .query(query)
        .definition(query)
        .datasource(DATASOURCE)
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(sort)
        .multi(multi)
        .include_all(multi)
    )
    if multi:
        variable = variable.all_value(".*")
    return variable


def run_variable(*, multi: bool) -> dash.QueryVariable:
    return query_variable("run", f"label_values({m.STEP}, {m.LABEL_RUN})", multi=multi,
                          sort=model.VariableSort.ALPHABETICAL_ASC)


def rank_variable(*, multi: bool, metric: str = m.STEP) -> dash.QueryVariable:
    return query_variable("rank", f'label_values({metric}{{{m.LABEL_RUN}=~"$run"}}, {m.LABEL_RANK})', multi=multi,
                          sort=model.VariableSort.NUMERICAL_ASC)


def layer_variable() -> dash.QueryVariable:
    query = f'label_values({m.GRAD_NORM}{{{m.LABEL_RUN}=~"$run", {m.LABEL_RANK}=~"$rank"}}, {m.LABEL_LAYER})'
    return query_variable("layer", query, multi=True, sort=model.VariableSort.NATURAL_ASC)


def base_dashboard(title: str, uid: str, description: str) -> dash.Dashboard:
    """Shared settings: tags, a 1 h window refreshed every 10 s, shared crosshair, links to the other dashboards."""
    return (
        dash.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG])
        .editable()
        .timezone("browser")
        .time("now-1h", "now")
        .refresh("10s")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .link(
            dash.DashboardLink("gradwatch")
            .type(model.DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(False)
            .include_vars(True)
            .keep_time(True)
        )
    )
