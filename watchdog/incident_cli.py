"""``gradwatch incident list|show``: an incident record read from the watchdog, as a timeline and a picture.

    gradwatch incident list [--run RUN] [--url URL]
    gradwatch incident show ID [--url URL] [-o incident.png]

Everything comes from the watchdog's own record (``GET /api/v1/incidents/ID``): no training
process is needed. The picture has the demo's panels — global gradient norm, per-layer
gradient norms, log10 update ratio with its healthy band, loss and learning-rate scale —
over seconds since the onset (a rollback sends the step back, so steps label the events
rather than the axis), with the onset, the alerts and the commands marked.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from gradwatch.watchdog import metric_names as mn
from gradwatch.watchdog.command_cli import DEFAULT_URL

BAND = (-4.0, -2.0)  # DL4J's healthy log10 update:parameter ratio band (as the demo's picture)
MAX_LAYERS = 10
MARKS = {"alert.firing": "tab:red", "command.applied": "tab:green", "rollback": "tab:purple", "stop": "black"}


def add_parser(commands) -> None:
    incident = commands.add_parser("incident", help="show incident records kept by the watchdog")
    sub = incident.add_subparsers(dest="incident_command", metavar="COMMAND", required=True)
    listing = sub.add_parser("list", help="incidents, newest first")
    listing.add_argument("--run")
    listing.add_argument("--url", default=None, help=f"watchdog URL (default $GRADWATCH_URL or {DEFAULT_URL})")
    listing.set_defaults(handler=_list)
    show = sub.add_parser("show", help="print an incident's timeline and draw its picture",
                          description="Print the timeline of incident ID (onset, alerts, decisions, commands with "
                          "their steps, outcome) and write a PNG of its evidence.")
    show.add_argument("id")
    show.add_argument("--url", default=None, help=f"watchdog URL (default $GRADWATCH_URL or {DEFAULT_URL})")
    show.add_argument("-o", "--output", default=None, help="PNG path (default incident-ID.png; '-' for none)")
    show.set_defaults(handler=_show)


def _get(args: argparse.Namespace, path: str) -> Any:
    base = (args.url or os.environ.get("GRADWATCH_URL") or DEFAULT_URL).rstrip("/")
    try:
        with urllib.request.urlopen(base + path, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"gradwatch incident: HTTP {exc.code} from {base}{path}: {exc.read().decode(errors='replace')}")
    except OSError as exc:
        raise SystemExit(f"gradwatch incident: cannot reach the watchdog at {base}: {exc}")


def _list(args: argparse.Namespace) -> int:
    query = f"?run={args.run}" if args.run else ""
    for i in _get(args, f"/api/v1/incidents{query}"):
        rules = ", ".join(sorted({a["rule"] for a in i["alerts"]}))
        print(f"{i['id']}  run {i['run']}  onset step {i['onset_step']}  {i['outcome']:<11}  {rules}")
    return 0


def describe(event: dict[str, Any]) -> str:
    """One line of the timeline."""
    kind, d = event["kind"], event["details"]
    if kind.startswith("alert."):
        return f"{kind.removeprefix('alert.')} {event['rule']} (value {d.get('value')})"
    if kind == "command.decided":
        spec = dict(d.get("spec", {}))
        action = spec.pop("action", "?")
        params = ", ".join(f"{k}={v}" for k, v in spec.items() if v is not None)
        return f"decided {action}({params}) by {event['rule'] or 'an operator'}"
    if kind == "command.acked":
        restored = f", restored step {d['restored_step']}" if d.get("restored_step") is not None else ""
        return f"agent {d.get('status')} {d.get('command_id', '')[:8]}{restored}: {d.get('detail', '')}"
    if kind == "command.suppressed":
        return f"not issued {d.get('spec', {}).get('action')}: {d.get('reason')}"
    if kind.startswith("incident."):
        return f"incident {kind.removeprefix('incident.')} {d.get('outcome') or ''}".rstrip()
    return f"{kind} {json.dumps(d)[:120]}"


def _show(args: argparse.Namespace) -> int:
    record = _get(args, f"/api/v1/incidents/{args.id}")
    print(f"incident {record['id']} — run {record['run']} — outcome: {record['outcome']}")
    print(f"onset at step {record['onset_step']} ({_clock(record['onset_at'])})")
    for event in record["timeline"]:
        step = event["step"] if event["step"] is not None else "?"
        offset = event["time"] - record["onset_at"]
        print(f"  {offset:+8.1f} s  step {step:>6}  {describe(event)}")
    if args.output != "-":
        try:
            path = draw(record, args.output or f"incident-{record['id']}.png")
        except ImportError:
            print("gradwatch incident: drawing needs matplotlib (pip install 'gradwatch[demo]')", file=sys.stderr)
            return 1
        print(f"picture: {path}")
    return 0


def _clock(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _points(record: dict, key: str) -> tuple[list[float], list[float]]:
    """(seconds since onset, value) of one evidence series, finite positive values only (log axes)."""
    xs, ys = [], []
    for t, v in record["evidence"].get(key, []):
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(t - record["onset_at"])
            ys.append(v)
    return xs, ys


def draw(record: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(11, 12), sharex=True, constrained_layout=True)
    norm_ax, layer_ax, ratio_ax, loss_ax = axes
    fig.suptitle(f"incident {record['id']}: run {record['run']}, onset at step {record['onset_step']}, {record['outcome']}")
    evidence = record["evidence"]

    norm_ax.set_title("global gradient norm")
    for key, label, style in ((mn.GRAD_GLOBAL_NORM, "at each scrape", "-"), (mn.GRAD_GLOBAL_NORM_MAX, "max between scrapes", ":")):
        xs, ys = _points(record, key)
        norm_ax.plot(xs, [y if y > 0 else math.nan for y in ys], ls=style, lw=1, label=label)
    norm_ax.set_yscale("log")

    layer_ax.set_title("per-layer gradient norm")
    layers = [k for k in evidence if k.startswith(mn.GRAD_NORM + "{")]
    peak = {k: max((y for y in _points(record, k)[1]), default=0.0) for k in layers}
    shown = sorted(layers, key=peak.get, reverse=True)[:MAX_LAYERS]
    for i, key in enumerate(shown):
        xs, ys = _points(record, key)
        layer_ax.plot(xs, [y if y > 0 else math.nan for y in ys], lw=1, color=f"C{i}", label=key.split("{", 1)[1][:-1])
    layer_ax.set_yscale("log")
    if shown:
        layer_ax.legend(fontsize=7, ncol=2, loc="upper left")

    ratio_ax.set_title("log10 update:parameter ratio with the healthy band")
    ratio_ax.axhspan(*BAND, color="tab:green", alpha=0.12, label="healthy band (DL4J)")
    for i, key in enumerate(shown):
        xs, ys = _points(record, key.replace(mn.GRAD_NORM, mn.UPDATE_RATIO, 1))
        ratio_ax.plot(xs, [math.log10(y) if y > 0 else math.nan for y in ys], lw=1, color=f"C{i}")
    ratio_ax.legend(fontsize=7, loc="upper left")

    loss_ax.set_title("training loss and learning-rate scale")
    xs, ys = _points(record, mn.LOSS)
    loss_ax.plot(xs, [y if y > 0 else math.nan for y in ys], color="tab:blue", lw=1, label="loss")
    loss_ax.set_yscale("log")
    loss_ax.set_xlabel("seconds since the onset")
    scale_ax = loss_ax.twinx()
    scale_ax.plot(*_points(record, mn.LR_SCALE), color="tab:purple", lw=1, label="LR scale")
    scale_ax.set_ylabel("LR scale")

    seen = set()
    for ax in axes:
        ax.axvline(0, color="black", lw=1.2, label="onset" if ax is norm_ax else None)
    for event in record["timeline"]:
        kind = _mark_kind(event)
        if kind is None:
            continue
        x = event["time"] - record["onset_at"]
        for ax in axes:
            ax.axvline(x, color=MARKS[kind], lw=1, ls="--", alpha=0.8,
                       label=kind.replace(".", " ") if ax is norm_ax and kind not in seen else None)
        norm_ax.annotate(f"step {event['step']}", (x, 1), xycoords=("data", "axes fraction"), fontsize=7,
                         rotation=90, va="top", ha="right", color=MARKS[kind])
        seen.add(kind)
    norm_ax.legend(fontsize=7, loc="upper left")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mark_kind(event: dict) -> str | None:
    if event["kind"] == "alert.firing":
        return "alert.firing"
    if event["kind"] == "command.acked" and event["details"].get("status") == "applied":
        if event["details"].get("restored_step") is not None:
            return "rollback"
        return "stop" if "stop" in event["details"].get("detail", "") else "command.applied"
    return None
