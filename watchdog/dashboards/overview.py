"""The run overview: is this training healthy right now, and what did the guard and the watchdog do?

Top row: the latest values at a glance. Then gradients, loss and learning rate over
time, and what the guard (skipped steps, non-finite gradients) and the watchdog
(clipping, LR scale, commands — also drawn as annotations on every panel) did.
"""

from __future__ import annotations

from gradwatch.watchdog import metric_names as m
from gradwatch.watchdog.dashboards.common import (
    DATASOURCE,
    RATE_INTERVAL,
    base_dashboard,
    dashed,
    datasource_variable,
    events,
    rank_variable,
    run_variable,
    select,
    series_panel,
    target,
)
from gradwatch.watchdog.dashboards.sdk import common, common_builders, dash, model, stat, statetimeline

UID = "gradwatch-overview"
RUN = "{{run}} r{{rank}}"

# Annotations: Grafana runs the query as a range query with this step; each step at
# which a command was applied within the window opens (or extends) one region.
COMMAND_WINDOW = "1m"
COMMAND_STEP = "30s"


def _stat(title: str, description: str, expr: str, *, unit: str = "none", decimals: float | None = None,
          mappings: list | None = None, thresholds: list[model.Threshold] | None = None) -> stat.Panel:
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(target(expr, RUN))
        .unit(unit)
        .span(4)
        .height(4)
        .graph_mode(common.BigValueGraphMode.AREA)
        .color_mode(common.BigValueColorMode.VALUE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    if decimals is not None:
        panel = panel.decimals(decimals)
    if mappings:
        panel = panel.mappings(mappings)
    steps = thresholds or [model.Threshold(value=None, color="text")]
    return panel.thresholds(dash.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(steps))


def _counter_total(counter: str) -> str:
    # Counters appear with their first event: "or vector(0)" shows 0, not "No data", until then.
    return f"sum({select(counter)}) or vector(0)"


def _at_a_glance() -> list:
    bad_if_any = [model.Threshold(value=None, color="green"), model.Threshold(value=1, color="red")]
    clipping = model.ValueMap(options={
        "0": model.ValueMappingResult(text="off", color="text", index=0),
        "1": model.ValueMappingResult(text="clipping", color="orange", index=1),
    })
    return [
        _stat("Step", "Optimizer steps attempted (skipped steps included).", select(m.STEP)),
        _stat("Loss (latest)", "Latest loss reported with Agent.observe().", select(m.LOSS), decimals=4),
        _stat("LR scale", "Remediation multiplier on the scheduled learning rate (1 = untouched).",
              select(m.LR_SCALE), decimals=3,
              thresholds=[model.Threshold(value=None, color="orange"), model.Threshold(value=1, color="green")]),
        _stat("Clipping", "Whether gradwatch clips gradients (enabled by config or by a watchdog command).",
              select(m.CLIPPING_ACTIVE), mappings=[clipping]),
        _stat("Skipped steps (total)", "Steps the guard skipped since the agents started (all selected runs and ranks).",
              _counter_total(m.SKIPPED_STEPS_TOTAL), thresholds=bad_if_any),
        _stat("Non-finite gradients (total)", "NaN/Inf gradient elements seen since the agents started.",
              _counter_total(m.NONFINITE_GRADS_TOTAL), thresholds=bad_if_any),
    ]


def _gradients() -> list:
    norm = series_panel(
        "Global gradient norm",
        "Global L2 norm of the gradients at the latest measured step, the largest since Prometheus's previous "
        "scrape (a one-step spike between scrapes still shows), and the clipping threshold while clipping is on.",
        target(select(m.GRAD_GLOBAL_NORM), f"{RUN} norm", "A"),
        target(select(m.GRAD_GLOBAL_NORM_MAX), f"{RUN} max since last scrape", "B"),
        target(select(m.CLIP_THRESHOLD), f"{RUN} clip threshold", "C"),
        log=True,
    )
    loss = series_panel(
        "Loss",
        "Latest loss, and the largest since Prometheus's previous scrape.",
        target(select(m.LOSS), f"{RUN} loss", "A"),
        target(select(m.LOSS_MAX), f"{RUN} max since last scrape", "B"),
    )
    return [dashed(dashed(norm, "B"), "C"), dashed(loss, "B")]


def _learning_rate() -> list:
    lr = series_panel(
        "Effective learning rate",
        "Learning rate each param group trains with: the scheduler's value times the remediation scale.",
        target(select(m.LEARNING_RATE), f"{RUN} group {{{{group}}}}"),
        log=True,
    )
    scale = series_panel(
        "LR scale (remediation)",
        "Multiplier the watchdog's lower_lr commands put on the scheduled learning rate; restore_lr sets it back to 1.",
        target(select(m.LR_SCALE), RUN),
    ).axis_soft_min(0).axis_soft_max(1)
    return [lr, scale]


def _guard() -> list:
    skipped = series_panel(
        "Skipped steps",
        "Steps the guard skipped in each interval, by reason: nonfinite (this rank's gradients held NaN/Inf) or "
        "nonfinite_peer (another rank's did). Empty while no step was ever skipped.",
        target(f"sum by (run, rank, reason) ({events(select(m.SKIPPED_STEPS_TOTAL), RATE_INTERVAL)})",
               f"{RUN} {{{{reason}}}}"),
    ).draw_style(common.GraphDrawStyle.BARS).fill_opacity(80)
    nonfinite = series_panel(
        "Non-finite gradient elements",
        "NaN/Inf gradient elements seen in each interval, by kind (nan, inf, overflow). The per-layer dashboard "
        "names the layers. Empty while no gradient was ever non-finite.",
        target(f"sum by (run, rank, kind) ({events(select(m.NONFINITE_GRADS_TOTAL), RATE_INTERVAL)})",
               f"{RUN} {{{{kind}}}}"),
    ).draw_style(common.GraphDrawStyle.BARS).fill_opacity(80)
    return [skipped, nonfinite]


def _remediation() -> list:
    clipping = (
        statetimeline.Panel()
        .title("Clipping state")
        .description("When gradwatch clipped gradients.")
        .datasource(DATASOURCE)
        .with_target(target(select(m.CLIPPING_ACTIVE), RUN))
        .span(8)
        .height(8)
        .mappings([model.ValueMap(options={
            "0": model.ValueMappingResult(text="off", color="transparent", index=0),
            "1": model.ValueMappingResult(text="clipping", color="orange", index=1),
        })])
        .show_value(common.VisibilityMode.NEVER)
    )
    threshold = series_panel(
        "Clip threshold",
        "Current clipping threshold (its unit depends on the mode: a norm, or an absolute value for clip_value). "
        "Empty until clipping was enabled once.",
        target(select(m.CLIP_THRESHOLD), RUN),
        width=8,
    )
    commands = series_panel(
        "Commands applied",
        "Watchdog commands the agent applied since it started, by action (each one is also an annotation). "
        "Empty until the first command.",
        target(select(m.COMMANDS_APPLIED_TOTAL), f"{RUN} {{{{action}}}}"),
        width=8,
    ).line_interpolation(common.LineInterpolation.STEP_AFTER)
    return [clipping, threshold, commands]


def commands_annotation() -> dash.AnnotationQuery:
    applied = events(select(m.COMMANDS_APPLIED_TOTAL), COMMAND_WINDOW)
    return (
        dash.AnnotationQuery()
        .name("Commands applied")
        .datasource(DATASOURCE)
        .enable(True)
        .icon_color("orange")
        .expr(f"sum by (run, rank, action) ({applied}) > 0")
        .step(COMMAND_STEP)
        .title_format("{{action}}")
        .text_format(f"run {{{{run}}}} rank {{{{rank}}}}: {{{{action}}}} applied within {COMMAND_WINDOW}")
        .tag_keys("run,action")
    )


def build_overview():
    """The overview dashboard (a grafana-foundation-sdk builder; ``.build()`` gives the model)."""
    board = (
        base_dashboard(
            "gradwatch: run overview",
            UID,
            "Gradient health of PyTorch trainings watched by gradwatch: global norm, loss, learning rate, "
            "skipped steps, non-finite gradients, and the remediation the watchdog applied.",
        )
        .with_variable(datasource_variable())
        .with_variable(run_variable(multi=True))
        .with_variable(rank_variable(multi=True))
        .annotation(commands_annotation())
    )
    for panel in _at_a_glance():
        board = board.with_panel(panel)
    sections = [
        ("Gradients and loss", _gradients()),
        ("Learning rate", _learning_rate()),
        ("Guard", _guard()),
        ("Remediation", _remediation()),
    ]
    for title, panels in sections:
        board = board.with_row(dash.Row(title))
        for panel in panels:
            board = board.with_panel(panel)
    return board
