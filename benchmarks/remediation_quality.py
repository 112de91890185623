"""Does gradwatch help the runs it should and leave the others alone? (issue 12's "Shown by")

Each case of ``remediation_scenarios.py`` (healthy hard negatives and pathologies) runs three
times with the same seed:

- **watched**: the agent with its defaults, in the closed loop with the real service
  (``gradwatch serve`` in a child process, the default rule pack with every duration divided
  by the same factor as the demo does — rules, the service's cooldowns, command window, TTL and
  undo wait, the agent's LR-cut cooldown and window), at a realistic pace: a real job takes ~1 s a step
  and is scraped every 2 s, so here a step takes ``--step-ms`` and the watchdog scrapes every
  2 steps' worth of time (agents are told to poll at the same scale: 1 s -> 1/2 scrape);
- **unmonitored**: plain PyTorch, no agent;
- **reference fix** (pathologies): from the onset, what an operator who knew would do:
  global-norm clipping at 2x the median norm of the 50 steps before the onset, the LR
  halved, non-finite steps skipped.

Printed: one row per case (alerted, onset -> held gradient, onset -> alert, commands
applied, remediations still in force at the end, held-out loss of the three runs) and the
goals with met/missed. Nothing here tunes gradwatch: the thresholds are the shipped ones.

    python benchmarks/remediation_quality.py            # the whole suite, ~5-8 min on 2 cores
    python benchmarks/remediation_quality.py --quick    # 3 short cases, a smoke test
    python benchmarks/remediation_quality.py --cases saddle_escape,explosion_early --seed 1
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gradwatch.agent  # noqa: E402
from common import format_table, header_lines, mark  # noqa: E402
from gradwatch.demo import scenarios  # noqa: E402
from gradwatch.demo.record import AgentRecorder  # noqa: E402
from gradwatch.demo.rules import scaled_agent_bounds, scaled_settings, write_config  # noqa: E402
from gradwatch.demo.run import _wait_until_scraped  # noqa: E402
from gradwatch.demo.services import NotificationSink, WatchdogProcess  # noqa: E402
from gradwatch.demo.timeline import Timeline  # noqa: E402
from remediation_scenarios import CASES, QUICK, Case  # noqa: E402

ONSET_FACTOR = 10.0  # a measured onset: the norm at 10x the median of the 50 steps before it
HEALTHY_TOLERANCE = 1.02  # a healthy watched run may end at most 2 % above the unmonitored one
RESCUE_GOAL = 0.9


@dataclass
class Plain:
    final: float
    norms: list[float]
    initial: float  # held-out loss of the untrained model


@dataclass
class Watched:
    final: float
    held_steps: list[int]  # agent steps (1-based) the guard clipped or skipped
    alerts: list[tuple[int, str]]  # (steps completed when it fired, rule)
    commands: int
    lasting: list[str]
    norms: list[float]  # raw global norm of each step, as the agent measured it
    held_fraction_max: float = 0.0


@dataclass
class Result:
    case: Case
    onset: int | None  # agent step (1-based) of the fault's first step
    watched_onset: int | None  # the same in the watched run (a measured onset moves once the guard held earlier spikes)
    plain: Plain
    watched: Watched
    reference: float | None = None
    notes: list[str] = field(default_factory=list)


def _finite_norm(model: torch.nn.Module) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads else math.nan


def run_plain(case: Case, seed: int, quick: bool) -> tuple[Plain, dict]:
    sc = case.build(seed, quick)
    initial = scenarios.evaluate(sc)
    norms = []
    for step in range(sc.steps):
        scenarios.train_step(sc, step)
        norms.append(_finite_norm(sc.model))
        scenarios.optimizer_step(sc)
    return Plain(scenarios.evaluate(sc), norms, initial), sc.info


def measured_onset(norms: list[float]) -> int | None:
    """0-based step of the first norm at ONSET_FACTOR x the median of the 50 before it (or non-finite)."""
    for i in range(20, len(norms)):
        recent = [n for n in norms[max(0, i - 50) : i] if math.isfinite(n)]
        if not math.isfinite(norms[i]) or (recent and norms[i] > ONSET_FACTOR * statistics.median(recent)):
            return i
    return None


def run_reference(case: Case, seed: int, quick: bool, onset: int, norms: list[float]) -> float:
    """From ``onset`` (0-based): clip at 2x the pre-onset median, LR x 0.5, skip non-finite steps."""
    sc = case.build(seed, quick)
    before = [n for n in norms[max(0, onset - 50) : onset] if math.isfinite(n)]
    clip = 2.0 * statistics.median(before) if before else 1.0
    for step in range(sc.steps):
        scenarios.train_step(sc, step)
        fixing = step >= onset
        if fixing:
            params = [p for p in sc.model.parameters() if p.grad is not None]
            if not math.isfinite(_finite_norm(sc.model)):
                sc.optimizer.zero_grad(set_to_none=True)
            else:
                torch.nn.utils.clip_grad_norm_(params, clip)
            saved = [g["lr"] for g in sc.optimizer.param_groups]
            for g in sc.optimizer.param_groups:
                g["lr"] = g["lr"] * 0.5
        if sc.clip_norm is not None:  # the recipe's own clipping, as scenarios.optimizer_step does
            torch.nn.utils.clip_grad_norm_(sc.model.parameters(), sc.clip_norm)
        sc.optimizer.step()
        if fixing:  # the scheduler keeps owning the LR: the cut multiplies what it set
            for g, lr in zip(sc.optimizer.param_groups, saved):
                g["lr"] = lr
        if sc.scheduler is not None:
            sc.scheduler.step()
    return scenarios.evaluate(sc)


def run_watched(
    case: Case, seed: int, quick: bool, wd: WatchdogProcess, step_s: float, tag: str, time_scale: float
) -> Watched:
    sc = case.build(seed, quick)
    run = f"quality-{case.name}-{tag}"
    agent = gradwatch.agent.watch(sc.model, sc.optimizer, run=run, port=0, watchdog_url=wd.url,
                                  secret_file=str(wd.secret_file), **scaled_agent_bounds(time_scale))
    recorder = AgentRecorder(agent.telemetry)
    held_fraction = 0.0
    try:
        _wait_until_scraped(wd, run)
        with Timeline(wd, run, sc.steps, out=io.StringIO()) as timeline:
            start = time.monotonic()
            for step in range(sc.steps):
                loss = scenarios.train_step(sc, step)
                agent.observe(loss=loss)
                scenarios.optimizer_step(sc)
                recorder.record(step + 1)
                timeline.tick(step + 1, "")
                held_fraction = max(held_fraction, agent.telemetry.read().guard_held_fraction)
                pause = start + (step + 1) * step_s - time.monotonic()
                if pause > 0:
                    time.sleep(pause)  # the pace of a real job, in steps per scrape
            final = scenarios.evaluate(sc)
            timeline.settle(1.0)
        view = agent.telemetry.read()
        lasting = []
        if agent.remedy.lr_scale != 1.0:
            lasting.append(f"lr x{agent.remedy.lr_scale:g}")
        if agent.remedy.clipping_active:
            lasting.append(f"{agent.remedy.clip_mode} clip")
    finally:
        agent.close()
    alerts = [(e.step, e.text.split()[1]) for e in timeline.events if e.kind == "alert.firing"]
    held = [s for s, _ in recorder.trace.guard]
    return Watched(final, held, alerts, sum(view.commands.values()), lasting, recorder.trace.grad_norm, held_fraction)


def _rescue(result: Result) -> float | None:
    """Share of the reference fix's improvement over the untrained model that the watched run keeps."""
    if result.reference is None or not math.isfinite(result.reference):
        return None
    gain = result.plain.initial - result.reference
    if gain <= 0:
        return None
    watched = result.watched.final
    return 0.0 if not math.isfinite(watched) else (result.plain.initial - watched) / gain


def _latency(events: list[int], onset: int | None) -> int | None:
    after = [s - onset for s in events if onset is not None and s >= onset]
    return min(after) if after else None


def _fmt(value, spec: str = ".4g") -> str:
    if value is None:
        return "—"
    return format(value, spec) if isinstance(value, float) else str(value)


def rows_for(results: list[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        w = r.watched
        rules = sorted({rule for _, rule in w.alerts})
        held = _latency(w.held_steps, r.watched_onset)
        alert = _latency([s for s, _ in w.alerts], r.watched_onset)
        rescue = _rescue(r)
        onset = _fmt(r.onset) if r.watched_onset == r.onset else f"{_fmt(r.onset)} (w {_fmt(r.watched_onset)})"
        rows.append([
            r.case.name, "healthy" if r.case.healthy else "pathology", onset,
            ",".join(rules) if rules else "no", _fmt(len(w.held_steps)), _fmt(held), _fmt(alert),
            _fmt(w.commands), ",".join(w.lasting) or "0", _fmt(w.final), _fmt(r.plain.final), _fmt(r.reference),
            "—" if rescue is None else f"{rescue:.0%}",
        ])
    return rows


def goals(results: list[Result]) -> list[list[str]]:
    healthy = [r for r in results if r.case.healthy]
    sick = [r for r in results if not r.case.healthy]
    explosions = [r for r in sick if r.case.explosion]
    out = []

    def goal(text: str, value: str, ok: bool | None) -> None:
        out.append([text, value, mark(ok)])

    if healthy:
        lasting = sum(bool(r.watched.lasting) for r in healthy)
        goal("healthy runs with a lasting remediation", f"{lasting} of {len(healthy)} (goal 0)", lasting == 0)
        worse = [r.case.name for r in healthy if not _no_worse(r)]
        goal(f"healthy runs ending worse than unmonitored (> {HEALTHY_TOLERANCE - 1:.0%})",
             ", ".join(worse) or "none", not worse)
        alarms = [r.case.name for r in healthy if r.watched.alerts]
        goal("healthy runs alerted (shown, not judged)", ", ".join(alarms) or "none", None)
    if sick:
        silent = [r.case.name for r in sick if not r.watched.alerts]
        goal("pathologies alerted", f"{len(sick) - len(silent)} of {len(sick)}" + (f" (missed: {', '.join(silent)})" if silent else ""),
             not silent)
    if explosions:
        rescues = {r.case.name: _rescue(r) for r in explosions}
        low = [f"{n} {v:.0%}" for n, v in rescues.items() if v is not None and v < RESCUE_GOAL]
        goal(f"explosions rescued to >= {RESCUE_GOAL:.0%} of the reference fix",
             ", ".join(low) or "all", not low)
        # A run whose watched twin never exploded (the guard held it off before any 10x step) has no
        # onset to measure from: it is left out of the medians and named.
        timed = [r for r in explosions if r.watched_onset is not None]
        prevented = [r.case.name for r in explosions if r.watched_onset is None]
        held = [_latency(r.watched.held_steps, r.watched_onset) for r in timed]
        alert = [_latency([s for s, _ in r.watched.alerts], r.watched_onset) for r in timed]
        for name, values, limit in (("held gradient", held, 1), ("alert", alert, 5)):
            known = [v if v is not None else math.inf for v in values]  # never held / never alerted: infinite
            median = statistics.median(known) if known else None
            shown = _fmt(median if median is not None and math.isfinite(median) else None)
            if prevented:
                shown += f" (no onset in the watched run: {', '.join(prevented)})"
            goal(f"median onset -> {name} (steps, goal <= {limit})", shown, None if median is None else median <= limit)
    return out


def _no_worse(r: Result) -> bool:
    w, p = r.watched.final, r.plain.final
    if not math.isfinite(p):
        return True
    return math.isfinite(w) and w <= p * HEALTHY_TOLERANCE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}, shortened")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-ms", type=float, default=50.0, help="watched step pace (default 50 ms = a 1-s step)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = args.cases.split(",") if args.cases else list(QUICK) if args.quick else [c.name for c in CASES]
    known = {c.name: c for c in CASES}
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    step_s = args.step_ms / 1000
    scrape_s = 2 * step_s  # a 2-s scrape of 1-s steps
    time_scale = 1.0 / step_s  # real durations (written for 1-s steps) divided by this
    print("\n".join(header_lines({
        "torch": f"{torch.__version__}, 1 thread",
        "pace": f"a step every {args.step_ms:g} ms, a scrape every {scrape_s * 1000:g} ms (2 steps), "
                f"rule durations / {time_scale:g}, agents polling every {step_s * 1000:g} ms",
        "seed": str(args.seed),
    })))
    started = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="gradwatch-quality-") as tmp:
        workdir = Path(tmp)
        with NotificationSink(workdir / "notifications.jsonl") as sink:
            config = write_config(workdir / "watchdog.yaml", sink.url, time_scale)
            with WatchdogProcess(workdir, config, scrape_s, poll_s=step_s, settings=scaled_settings(time_scale)) as wd:
                for name in names:
                    case = known[name]
                    t0 = time.monotonic()
                    plain, info = run_plain(case, args.seed, args.quick)
                    onset0 = None if case.healthy else info.get("onset", measured_onset(plain.norms))
                    watched = run_watched(case, args.seed, args.quick, wd, step_s, f"s{args.seed}", time_scale)
                    injected = "onset" in info
                    watched0 = onset0 if injected or onset0 is None else measured_onset(watched.norms)
                    result = Result(case, None if onset0 is None else onset0 + 1,
                                    None if watched0 is None else watched0 + 1, plain, watched)
                    if onset0 is not None and not case.healthy:
                        result.reference = run_reference(case, args.seed, args.quick, onset0, plain.norms)
                    results.append(result)
                    print(f"  {name}: {time.monotonic() - t0:.0f} s", flush=True)
    headers = ["case", "kind", "onset", "alerted", "held", "onset→held", "onset→alert", "commands", "lasting",
               "loss watched", "unmonitored", "reference", "rescue"]
    print("\n" + format_table(headers, rows_for(results)))
    print("\nonset: the fault's first step (injected, or the first norm at 10x its 50-step median on the unmonitored "
          "run; (w N): the same measured on the watched run, whose trajectory differs once the guard held a step, and "
          "used for its latencies); held: steps the guard clipped or skipped; latencies in steps after the onset step; lasting: "
          "remediations still in force at the end; loss: held-out loss at the end; rescue: share of the reference "
          "fix's gain over the untrained model kept by the watched run.")
    print("\n" + format_table(["goal", "measured", "met"], goals(results), "<<^"))
    print(f"\n{len(results)} cases in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
