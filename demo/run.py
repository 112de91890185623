"""``gradwatch demo``: a real training run going wrong, gradwatch catching and fixing it.

1. The watchdog service starts as it would in production (``gradwatch serve`` on
   loopback, the default rule pack, a generated command secret, a webhook notifier).
2. A scenario from :mod:`gradwatch.demo.scenarios` trains with the agent attached; the
   terminal tells what happens as it happens (see :mod:`gradwatch.demo.timeline`).
3. The same seed trains again without gradwatch; a table compares the two endings.
4. ``demo.png``, ``trace.json``, ``timeline.txt`` and the services' files are written to
   the output directory, whose path is printed.
"""

from __future__ import annotations

import math
import signal
import statistics
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import gradwatch.agent
from gradwatch.demo import scenarios
from gradwatch.demo.record import AgentRecorder, Trace, record_plain
from gradwatch.demo.rules import scaled_agent_bounds, scaled_settings, write_config
from gradwatch.demo.services import NotificationSink, WatchdogProcess
from gradwatch.demo.timeline import Event, Timeline

@dataclass(frozen=True)
class Story:
    time_scale: float = 10.0
    """How much faster than real time the watchdog's rules run (see gradwatch.demo.rules)."""
    overrides: dict = field(default_factory=dict)
    """Scenario settings for the demo (a longer run where the story needs one)."""
    moral: str = ""
    """What to take away, printed at the end."""


STORIES: dict[str, Story] = {
    # Its policy lowers the LR 5 s after enabling clipping: at 10x, while the run still trains.
    "exploding_rnn": Story(10.0, moral="The agent's guard held the first spikes locally, within the step; the watchdog's "
                       "policy then enabled clipping and lowered the learning rate, and the run ended close to the "
                       "same recipe clipped from step 0 (held-out loss 0.0030). Without gradwatch the same seed went "
                       "to NaN."),
    "nan_batch": Story(10.0, moral="The guard skipped the poisoned step before the optimizer applied it (parameters and "
                       "Adam's moments untouched) and the watchdog told the on-call channel. No remediation is "
                       "needed for a single bad record; a repeat (RepeatedNonFinite) would enable clipping and "
                       "lower the learning rate."),
    # VanishingGradients waits 5 minutes (`for: 5m`): at 60x that is 5 s of this run.
    "vanishing": Story(60.0, {"steps": 3000}, moral="gradwatch names the first and last layers and notifies, but "
                       "does not remediate: a lower learning rate or clipping cannot bring back a signal 1e-15 "
                       "smaller. The fix is in the model (ReLU/GELU, normalisation, residual connections, init)."),
    # GradientSpikesHeld counts spikes over 1 minute and escalates after 5 s: at 10x, within this run.
    "lr_too_high": Story(10.0, moral="The damage came early in the warm-up, within the guard's first tens of steps "
                         "of history; gradwatch held the spikes, and on evidence of harm enabled clipping and lowered "
                         "the learning rate, which limits the harm but cannot undo it; once the run has been healthy for "
                         "restore_after, the watchdog gives the learning rate back stepwise. The alert is the signal to fix the schedule."),
}
# Denser than the agent's defaults (every=50, detail_every=250) for a smoother picture;
# the default pack behaves the same either way.
AGENT_SETTINGS = {"every": 5, "detail_every": 10}
# What the demo writes into its directory (the watchdog adds gradwatch.db and its WAL files).
OUTPUT_FILES = ("demo.png", "timeline.txt", "trace.json", "trace-without.json", "notifications.jsonl",
                "watchdog.yaml", "watchdog.log", "command-secret")
RECOVERY_WINDOW = 20  # steps averaged to call the loss back at its level before the incident


@dataclass(frozen=True)
class DemoOptions:
    scenario: str = "exploding_rnn"
    seed: int = 0
    out: Path = Path("gradwatch-demo")
    baseline: bool = True
    keep_running: bool = False
    # A demo step takes ~7 ms: at the service's defaults (2-s scrapes, 1-s polls) a command would
    # land 300+ steps after the alert, where a real run (~1 s a step) sees it within a few steps.
    interval_s: float = 0.25
    poll_s: float = 0.25


@dataclass
class Outcome:
    """How one run ended, for the comparison table."""

    trace: Trace
    skipped: int = 0
    spikes_clipped: int = 0
    commands: int = 0

    @property
    def nonfinite_losses(self) -> str:
        bad = self.trace.nonfinite_steps()
        return f"{len(bad)} from step {bad[0]}" if bad else "0"


def _status(trace: Trace, clipping: bool) -> str:
    loss, norm, lr = trace.loss[-1], trace.grad_norm[-1], trace.lr[-1]
    return f"loss {loss:.4g}  |g| {norm:.3g}  lr {lr:.3g}{'  clipping on' if clipping else ''}"


class _Recovery:
    """Notices when, after gradwatch acted (a NaN step skipped, a remediation applied), the
    loss is back at its level from before the incident (the first guard action or alert)."""

    def __init__(self) -> None:
        self.done = False
        self._reference: tuple[int, float | None] = (0, None)  # (incident step, median loss before it)

    def check(self, timeline: Timeline, trace: Trace) -> None:
        if self.done:
            return
        incident = [e.step for e in timeline.events if e.kind == "alert.firing"] + [s for s, _ in trace.guard]
        acted = [e.step for e in timeline.events if e.kind == "command" and " applied " in e.text]
        acted += [s for s, what in trace.guard if what.startswith("NaN")]
        if not incident or not acted or trace.steps[-1] - max(acted) < RECOVERY_WINDOW:
            return
        reference = self._before(min(incident), trace)
        recent = trace.loss[-RECOVERY_WINDOW:]
        if reference is not None and all(map(math.isfinite, recent)):
            mean = statistics.fmean(recent)
            if mean <= 1.05 * reference:
                self.done = True
                timeline.add("demo", "recovered", f"recovered: mean loss of the last {RECOVERY_WINDOW} steps {mean:.4g}, "
                             f"back at its level before the incident ({reference:.4g})")

    def _before(self, incident: int, trace: Trace) -> float | None:
        """Median finite loss of the steps just before ``incident`` (computed once per incident step)."""
        if self._reference[0] != incident:
            start = max(0, incident - 1 - RECOVERY_WINDOW)
            before = [v for v in trace.loss[start : max(1, incident - 1)] if math.isfinite(v)]
            self._reference = (incident, statistics.median(before) if before else None)
        return self._reference[1]


def _train_watched(
    opts: DemoOptions, overrides: dict, wd: WatchdogProcess, sink: NotificationSink, time_scale: float
) -> tuple[Outcome, list[Event]]:
    sc = scenarios.build(opts.scenario, seed=opts.seed, **overrides)
    run = f"demo-{opts.scenario}"
    agent = gradwatch.agent.watch(sc.model, sc.optimizer, run=run, port=0, watchdog_url=wd.url,
                                  secret_file=str(wd.secret_file), **AGENT_SETTINGS, **scaled_agent_bounds(time_scale))
    recorder, recovery = AgentRecorder(agent.telemetry), _Recovery()
    _wait_until_scraped(wd, run)
    print(f"agent: metrics at {agent.url}; watchdog at {wd.url} (API docs {wd.url}/docs)\n")
    try:
        with Timeline(wd, run, sc.steps) as timeline:
            sink.on_receive = lambda payload: timeline.add("notify", "notify", _notification(payload))
            for step in range(sc.steps):
                loss = scenarios.train_step(sc, step)
                agent.observe(loss=loss)
                scenarios.optimizer_step(sc)
                recorder.record(step + 1)
                recovery.check(timeline, recorder.trace)
                timeline.tick(step + 1, _status(recorder.trace, agent.remedy.clipping_active))
            recorder.trace.final_loss = scenarios.evaluate(sc)
            timeline.settle(3 * opts.interval_s + 2 * opts.poll_s + 1.0)  # the last round, notification and acknowledgement
            sink.on_receive = None
        view = agent.telemetry.read()
        outcome = Outcome(recorder.trace, view.skipped["nonfinite"], sum(view.spike_clipped.values()),
                          sum(view.commands.values()))
        if opts.keep_running:
            _wait_for_interrupt(agent.url, wd.url, run)
    finally:
        agent.close()
    return outcome, timeline.events


def _wait_until_scraped(wd: WatchdogProcess, run: str, timeout_s: float = 15.0) -> None:
    """Train once the watchdog has scraped the run: a counter it first sees at 1 has no increase
    (as in Prometheus), so a NaN step before the first scrape would go unseen by the counting rules.
    A run is seen at registration too (with its step), so only ``last_seen`` moving past
    ``registered_at`` tells a scrape."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(r["last_seen"] > r["registered_at"] for r in wd.get("/api/v1/runs", run=run)):
            return
        time.sleep(0.05)
    print(f"warning: the watchdog has not scraped {run} within {timeout_s:g} s; training anyway")


def _notification(payload: dict) -> str:
    annotations = payload.get("commonAnnotations") or {}
    return f"on-call receives [{str(payload.get('status', '?')).upper()}] {annotations.get('summary', payload)}"


def _wait_for_interrupt(metrics_url: str, watchdog_url: str, run: str) -> None:
    print(textwrap.dedent(f"""
        Services kept running (--keep-running). Look around:
          curl {metrics_url}                      # the agent's exposition
          curl '{watchdog_url}/api/v1/alerts?run={run}'
          curl '{watchdog_url}/api/v1/commands?run={run}'
          open {watchdog_url}/docs                # the watchdog's API
        Press Ctrl-C to stop them."""))
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train_plain(opts: DemoOptions, overrides: dict) -> Outcome:
    sc = scenarios.build(opts.scenario, seed=opts.seed, **overrides)
    trace = Trace()
    started = time.monotonic()
    for step in range(sc.steps):
        loss = scenarios.train_step(sc, step)
        record_plain(trace, step + 1, loss, sc.model, sc.optimizer.param_groups[0]["lr"])
        scenarios.optimizer_step(sc)
    trace.final_loss = scenarios.evaluate(sc)
    print(f"  trained {sc.steps} steps in {time.monotonic() - started:.1f} s")
    return Outcome(trace)


def _table(watched: Outcome, plain: Outcome | None) -> str:
    rows = [("", "with gradwatch", "without")]

    def fmt(value) -> str:
        return "—" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    def row(name, a, b):
        rows.append((name, fmt(a), fmt(b) if plain is not None else "(skipped)"))

    row("held-out loss at the end", watched.trace.final_loss, plain and plain.trace.final_loss)
    row("steps with a NaN/Inf loss", watched.nonfinite_losses, plain and plain.nonfinite_losses)
    row("steps skipped (NaN/Inf)", watched.skipped, 0)
    row("spikes clipped by the guard", watched.spikes_clipped, 0)
    row("remediations applied", watched.commands, 0)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"  {r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows)


def run_demo(opts: DemoOptions) -> int:
    torch.set_num_threads(1)  # small models: one thread is fastest, and the numbers quoted were measured so
    story = STORIES[opts.scenario]
    time_scale, overrides = story.time_scale, story.overrides
    out = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*"):  # a previous demo's state (alerts, commands) must not leak into this one
        if stale.name in OUTPUT_FILES or stale.name.startswith("gradwatch.db"):
            stale.unlink()
    print(f"gradwatch demo: {opts.scenario} (seed {opts.seed}); files in {out}\n")
    print(textwrap.fill(scenarios.describe(opts.scenario), width=100) + "\n")
    if time_scale != 1:
        print(f"Demo steps take milliseconds, real ones about a second: the watchdog runs the default rule pack "
              f"with every duration divided by {time_scale:g} (thresholds unchanged).\n")
    started = time.monotonic()
    with NotificationSink(out / "notifications.jsonl") as sink:
        config = write_config(out / "watchdog.yaml", sink.url, time_scale)
        with WatchdogProcess(out, config, opts.interval_s, opts.poll_s, scaled_settings(time_scale)) as wd:
            print(f"watchdog: `gradwatch serve` (pid {wd.pid}) on {wd.url}, scraping every {opts.interval_s:g} s, "
                  f"agents polling every {opts.poll_s:g} s (demo steps take milliseconds)")
            watched, events = _train_watched(opts, overrides, wd, sink, time_scale)
    (out / "timeline.txt").write_text("\n".join(f"{e.at:6.1f}s {e.step:>5}  {e.source:<9} {e.text}" for e in events) + "\n")
    watched.trace.save(out / "trace.json")
    plain = None
    if opts.baseline:
        print("\nThe same seed without gradwatch:")
        plain = _train_plain(opts, overrides)
        plain.trace.save(out / "trace-without.json")
    from gradwatch.demo.plot import draw  # matplotlib loads in a second or two: only now

    picture = draw(out / "demo.png", f"gradwatch demo: {opts.scenario} (seed {opts.seed})", watched.trace, plain and plain.trace, events)
    print("\n" + _table(watched, plain))
    print("\n" + textwrap.fill(story.moral, width=100))
    print(f"\npicture:  {picture}\ntimeline: {out / 'timeline.txt'}\nfiles:    {out}  ({time.monotonic() - started:.0f} s)")
    return 0


def main(args) -> int:
    opts = DemoOptions(scenario=args.scenario, seed=args.seed, out=Path(args.out), baseline=not args.no_baseline,
                       keep_running=args.keep_running)
    try:
        return run_demo(opts)
    except KeyboardInterrupt:
        print("\ninterrupted: services stopped", file=sys.stderr)
        return 130
