"""The per-layer view: where in the network gradients explode, vanish or stop updating the weights.

One run and one rank at a time (per-layer series come from rank 0 unless the agent
exports them on every rank). The heatmap orders layers by model depth, input at the
bottom, so a gradient that fades towards the input shows as a colour gradient down
the panel.
"""

from __future__ import annotations

from gradwatch.watchdog import metric_names as m
from gradwatch.watchdog.dashboards.common import (
    DATASOURCE,
    RATE_INTERVAL,
    base_dashboard,
    datasource_variable,
    events,
    layer_variable,
    rank_variable,
    run_variable,
    select,
    series_panel,
    target,
)
from gradwatch.watchdog.dashboards.sdk import common, common_builders, dash, heatmap, heatmap_model, model

UID = "gradwatch-layers"
LAYER = "{{layer}}"

# DL4J's guidance on log10(update / parameter): about -3 is healthy, above -2 unstable,
# below -4 the layer learns too slowly.
UPDATE_RATIO_LOW = -4
UPDATE_RATIO_HIGH = -2


def depth_ordered(expr: str) -> str:
    """``expr`` (one series per layer) with a ``depth`` label holding the layer's position in the model.

    PromQL cannot turn a value into a label except with ``count_values``: it gives one
    series per layer with ``depth="<gradwatch_layer_depth value>"``, joined onto ``expr``
    (its value 1 leaves ``expr``'s value unchanged). The heatmap's row names start with
    that number, and Grafana sorts rows whose names parse as numbers numerically, so
    rows follow model depth. Layers without a depth (the ``_other`` aggregate of
    ``top_k``) drop out.

    ``count_values by (...)`` loses its ``by`` labels in range queries on Prometheus
    2.42 (instant queries keep them; tests/dashboards/test_queries.py caught it), so
    the series are reduced to run/rank/layer first and counted ``without ()``.
    """
    layers = f"max by (run, rank, layer) ({select(m.LAYER_DEPTH, layer=True)})"
    depth = f'count_values without () ("depth", {layers})'
    return f"max by (depth, layer) ({expr} * on (run, rank, layer) group_left (depth) {depth})"


def _gradients() -> list:
    norms = series_panel(
        "Gradient L2 norm per layer",
        "L2 norm of each layer's gradient (log scale). Exploding layers climb away from the pack.",
        target(select(m.GRAD_NORM, layer=True), LAYER),
        log=True,
    )
    depth_map = (
        heatmap.Panel()
        .title("log10 mean |g| across depth (input at the bottom)")
        .description(
            "log10 of each layer's mean absolute gradient, one row per layer ordered by its position in the model "
            "(the number before the name; 0 = nearest the input). Vanishing gradients show as rows that fade "
            "towards the bottom; a sudden bright band is an explosion starting in those layers."
        )
        .datasource(DATASOURCE)
        .with_target(target(depth_ordered(f"log10({select(m.GRAD_ABS_MEAN, layer=True)})"), "{{depth}} {{layer}}"))
        .span(24)
        .height(12)
        .calculate(False)
        .rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.UNKNOWN).value("log10 mean |g|"))
        .color(heatmap.HeatmapColorOptions().mode(heatmap_model.HeatmapColorMode.SCHEME).scheme("Spectral")
               .scale(heatmap_model.HeatmapColorScale.LINEAR).steps(64))
        # Cells are log10 values, nearly all negative: the default filter (hide <= 1e-9) would hide them all.
        .filter_values(heatmap.FilterValueRange().le(-1e9))
        .cell_values(heatmap.CellValues().decimals(2))
        .show_legend()
    )
    max_abs = series_panel(
        "max |g| per layer",
        "Largest absolute gradient element of each layer (log scale).",
        target(select(m.GRAD_ABS_MAX, layer=True), LAYER),
        log=True,
    )
    return [norms, max_abs, depth_map]


def _updates() -> list:
    band = [
        model.Threshold(value=None, color="orange"),  # below -4: learning too slowly
        model.Threshold(value=UPDATE_RATIO_LOW, color="green"),
        model.Threshold(value=UPDATE_RATIO_HIGH, color="red"),  # above -2: unstable
    ]
    ratio = (
        series_panel(
            "log10 update ratio per layer",
            "log10 of mean|w_after - w_before| / mean|w_before| (DL4J's definition: momentum and weight decay "
            "included). Green band: -4 to -2, about -3 is healthy; above -2 the layer is unstable, below -4 it "
            "learns slowly (fine-tuning and a schedule's tail sit there by design). Sampled every detail_every "
            "steps, so empty until the agent's first detail step.",
            target(f"log10({select(m.UPDATE_RATIO, layer=True)})", LAYER),
        )
        .thresholds(dash.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(band))
        .thresholds_style(common_builders.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED_AND_AREA))
        .axis_soft_min(-6)
        .axis_soft_max(0)
    )
    params = series_panel(
        "Parameter L2 norm per layer",
        "L2 norm of each layer's weights (log scale): steady growth is weight blow-up, a collapse dead units.",
        target(select(m.PARAM_NORM, layer=True), LAYER),
        log=True,
    )
    return [ratio, params]


def _nonfinite() -> list:
    counts = series_panel(
        "Non-finite gradient elements by layer",
        "NaN/Inf gradient elements per layer and kind in each interval: the earliest layer to light up is "
        "usually where the trouble started. Empty while no gradient was ever non-finite.",
        target(f"sum by (layer, kind) ({events(select(m.NONFINITE_GRADS_TOTAL, layer=True), RATE_INTERVAL)})",
               "{{layer}} {{kind}}"),
        width=24,
    ).draw_style(common.GraphDrawStyle.BARS).fill_opacity(80)
    return [counts]


def build_layers():
    """The per-layer dashboard (a grafana-foundation-sdk builder; ``.build()`` gives the model)."""
    board = (
        base_dashboard(
            "gradwatch: layers",
            UID,
            "Per-layer gradient statistics of one gradwatch run and rank: norms, mean |g| across depth, update "
            "ratios against DL4J's healthy band, parameter norms and non-finite gradients.",
        )
        .with_variable(datasource_variable())
        .with_variable(run_variable(multi=False))
        .with_variable(rank_variable(multi=False, metric=m.GRAD_NORM))
        .with_variable(layer_variable())
    )
    sections = [("Gradients", _gradients()), ("Updates and weights", _updates()), ("Non-finite", _nonfinite())]
    for title, panels in sections:
        board = board.with_row(dash.Row(title))
        for panel in panels:
            board = board.with_panel(panel)
    return board
