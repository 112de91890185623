"""The demo's picture: one PNG a person would rather look at than read.

Four panels over training steps — global gradient norm, per-layer gradient norms, log10
update ratio with its healthy band, loss and learning rate — the run gradwatch watched
against the same seed without it, with the alerts and the actions taken marked on each.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened
import matplotlib.pyplot as plt  # noqa: E402

from gradwatch.demo.record import Trace  # noqa: E402
from gradwatch.demo.timeline import Event  # noqa: E402

# DL4J / cs231n: healthy training moves weights by about 1e-3 of their magnitude per step;
# above 1e-2 is unstable, below 1e-4 too slow (the README's update-ratio band).
BAND = (-4.0, -2.0)
MAX_LAYERS = 10  # more lines than this is a tangle: the largest by peak norm are drawn
MARKS = {  # event kind -> (colour, label)
    "alert.firing": ("tab:red", "alert fired"),
    "command": ("tab:green", "remediation applied"),
}


def _finite(xs: list[int], ys: list[float]) -> tuple[list[int], list[float]]:
    pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y) and y > 0]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _mark_events(axes, events: list[Event]) -> None:
    seen = set()
    for event in events:
        kind = "command" if event.kind == "command" and " applied " in event.text else event.kind
        if kind not in MARKS:
            continue
        colour, label = MARKS[kind]
        for ax in axes:
            ax.axvline(event.step, color=colour, lw=1, ls="--", alpha=0.8,
                       label=label if ax is axes[0] and kind not in seen else None)
        seen.add(kind)


def _mark_guard(ax, trace: Trace) -> None:
    """A triangle on the global norm at each step the agent's guard acted on."""
    norms = dict(zip(trace.steps, trace.grad_norm))
    for what, marker in (("spike clipped", "v"), ("NaN/Inf step skipped", "x")):
        steps = [s for s, w in trace.guard if w == what]
        if steps:
            ys = [norms[s] if math.isfinite(norms.get(s, math.nan)) and norms[s] > 0 else None for s in steps]
            floor = min((v for v in trace.grad_norm if math.isfinite(v) and v > 0), default=1.0)
            ax.scatter(steps, [y if y is not None else floor for y in ys], marker=marker, color="tab:orange",
                       zorder=3, label=f"agent guard: {what} ({len(steps)})")


def _cap(ax, watched: list[float], plain: list[float] | None, what: str) -> None:
    """Keep the protected run readable: when the unprotected one explodes by orders of
    magnitude, cut the axis at 100x the protected run's largest value and say how far it went."""
    top = max((v for v in watched if math.isfinite(v)), default=0.0)
    went = max((v for v in plain or [] if math.isfinite(v)), default=0.0)
    if top > 0 and went > 1e3 * top:
        ax.set_ylim(top=100 * top)
        ax.text(0.99, 0.95, f"without gradwatch the {what} reached {went:.1e}, then NaN/Inf", transform=ax.transAxes,
                ha="right", va="top", fontsize=8, color="dimgray")


def draw(path: Path, title: str, watched: Trace, plain: Trace | None, events: list[Event]) -> Path:
    fig, axes = plt.subplots(4, 1, figsize=(11, 12), sharex=True, constrained_layout=True)
    norm_ax, layer_ax, ratio_ax, loss_ax = axes
    fig.suptitle(title)

    norm_ax.set_title("global gradient norm")
    norm_ax.plot(*_finite(watched.steps, watched.grad_norm), color="tab:blue", lw=1, label="with gradwatch")
    if plain is not None:
        norm_ax.plot(*_finite(plain.steps, plain.grad_norm), color="tab:gray", lw=1, alpha=0.7, label="without")
    norm_ax.set_yscale("log")
    _cap(norm_ax, watched.grad_norm, plain and plain.grad_norm, "gradient norm")

    _mark_guard(norm_ax, watched)

    layer_ax.set_title("per-layer gradient norm (the agent's sampled steps)")
    peaks = {k: max((v for _, v in pts if math.isfinite(v)), default=0.0) for k, pts in watched.layer_norms.items()}
    shown = sorted(peaks, key=peaks.get, reverse=True)[:MAX_LAYERS]
    colours = {layer: f"C{i}" for i, layer in enumerate(shown)}
    for layer in shown:
        xs, ys = zip(*watched.layer_norms[layer])
        layer_ax.plot(*_finite(list(xs), list(ys)), lw=1, color=colours[layer], label=layer)
    layer_ax.set_yscale("log")
    layer_ax.legend(fontsize=7, ncol=2, loc="upper left")

    ratio_ax.set_title("log10 update:parameter ratio (mean|Δw| / mean|w|) with the healthy band")
    ratio_ax.axhspan(*BAND, color="tab:green", alpha=0.12, label="healthy band (DL4J)")
    ratio_ax.axhline(0, color="tab:red", lw=0.8, alpha=0.6, label="update as large as the weight")
    for layer in shown:  # same layers, same colours as above
        if layer in watched.update_ratio:
            xs, ys = zip(*watched.update_ratio[layer])
            ratio_ax.plot(xs, ys, lw=1, alpha=0.8, color=colours[layer])
    ratio_ax.legend(fontsize=7, loc="upper left")

    loss_ax.set_title("training loss and learning rate")
    loss_ax.plot(*_finite(watched.steps, watched.loss), color="tab:blue", lw=1, label="loss with gradwatch")
    if plain is not None:
        loss_ax.plot(*_finite(plain.steps, plain.loss), color="tab:gray", lw=1, alpha=0.7, label="loss without")
        dead = plain.nonfinite_steps()
        if dead:
            loss_ax.axvline(dead[0], color="black", lw=1.2, label=f"without: loss NaN/Inf from step {dead[0]}")
    loss_ax.set_yscale("log")
    _cap(loss_ax, watched.loss, plain and plain.loss, "loss")
    loss_ax.set_xlabel("optimizer step")
    lr_ax = loss_ax.twinx()
    lr_ax.plot(watched.steps, watched.lr, color="tab:purple", lw=1, alpha=0.7, label="learning rate (with gradwatch)")
    lr_ax.set_ylabel("learning rate")
    lines = loss_ax.get_legend_handles_labels()
    more = lr_ax.get_legend_handles_labels()
    loss_ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper left")

    _mark_events(axes, events)
    norm_ax.legend(fontsize=7, loc="upper left")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
