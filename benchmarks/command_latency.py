"""Scrape → evaluate → command latency: from the first bad training step to the remedy applied in the trainer.

    python benchmarks/command_latency.py [--quick] [--repeats N] [--interval S[,S...]]

Everything is real. ``gradwatch serve`` runs as a subprocess on loopback (one per scrape
interval, a generated GRADWATCH_SECRET, the default rule pack and poll interval); this
process trains a small MLP (one torch thread, seeded) with
``gradwatch.agent.watch(..., watchdog_url=...)`` attached. Each repeat is a fresh run:
healthy steps for a while (with a random extra, so bad steps land at any phase of the
watchdog's round and the agent's poll), then NaN gradients on BAD_STEPS consecutive
steps. The guard skips them, the default pack's RepeatedNonFinite (three or more skipped
steps within a minute) fires and its policy enables clipping; training goes on until the
trainer sees clipping on. Timestamps: the first bad step (this loop); the alert's firing,
the command's ``issued_at`` and ``delivered_at`` (the agent's poll fetched it) from the
watchdog's API; the command's acknowledgement (``at`` and ``step``, written by the agent
when it applied it), checked against the step at which this loop first sees clipping on.
The watchdog's own /metrics give its round and evaluation durations. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import gradwatch.agent
from gradwatch.demo.services import WatchdogProcess
from common import format_table, header_lines

RULE, ACTION = "RepeatedNonFinite", "enable_clipping"
BAD_STEPS = 3  # the rule's threshold: three skipped steps within a minute
HEALTHY_STEPS = 300  # `threshold: auto` needs 5 healthy sampled steps; the agent samples every 50th by default
WIDTH, DEPTH, BATCH = 384, 4, 64
POLL_S = 1.0  # the watchdog's default poll_interval, which it hands to every agent


@dataclass
class Repeat:
    """One run's timestamps (wall clock, seconds since the epoch) and step numbers."""

    bad_at: float
    bad_step: int
    fired_at: float
    issued_at: float
    polled_at: float  # the agent's poll fetched the command
    applied_at: float
    applied_step: int
    step_s: float  # median healthy step


# -- the watchdog process -----------------------------------------------------------------------


def round_durations(url: str) -> dict[str, float]:
    """Mean round and evaluation time (s) and the number of rounds, from the watchdog's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    count = values["gradwatch_watchdog_round_duration_seconds_count"]
    return {
        "rounds": count,
        "round": values["gradwatch_watchdog_round_duration_seconds_sum"] / count,
        "evaluation": values["gradwatch_watchdog_evaluation_duration_seconds_sum"] / count,
    }


# -- one run ------------------------------------------------------------------------------------


def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(WIDTH, 10))
    batches = [(torch.randn(BATCH, WIDTH), torch.randint(0, 10, (BATCH,))) for _ in range(8)]
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), batches


def run_once(wd: WatchdogProcess, run: str, seed: int, settle_s: float, attach_s: float, delay_s: float,
             timeout_s: float = 30.0) -> Repeat:
    """Wait ``attach_s``, attach; healthy steps (at least HEALTHY_STEPS and ``settle_s``, then ``delay_s`` more),
    BAD_STEPS steps with a NaN gradient, then healthy steps until the trainer sees clipping on."""
    model, opt, batches = build(seed)
    time.sleep(attach_s)
    agent = gradwatch.agent.watch(model, opt, run=run, port=0, watchdog_url=wd.url, secret_file=str(wd.secret_file))
    step_times: list[float] = []

    def train_step(bad: bool = False) -> None:
        x, y = batches[agent.step % len(batches)]
        t = time.perf_counter()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if bad:
            model[0].weight.grad[0, 0] = float("nan")
        agent.observe(loss=loss)
        opt.step()
        step_times.append(time.perf_counter() - t)

    try:
        started = time.monotonic()  # settle_s: the agent registered and the watchdog scraped it
        while agent.step < HEALTHY_STEPS or time.monotonic() - started < settle_s:
            train_step()
        until = time.monotonic() + delay_s
        while time.monotonic() < until:
            train_step()
        step_s = statistics.median(step_times)  # healthy steps only
        bad_at, bad_step = time.time(), agent.step + 1  # the agent numbers optimizer steps from 1
        for _ in range(BAD_STEPS):
            train_step(bad=True)
        while not agent.remedy.clipping_active:
            if time.time() - bad_at > timeout_s:
                acks = [c["ack"] for c in wd.get("/api/v1/commands", run=run)]
                raise RuntimeError(f"{run}: no clipping within {timeout_s:g} s of the first bad step; acks: {acks}")
            train_step()
        seen_step = agent.step  # the step whose update first ran with clipping on
    finally:
        agent.close()  # flushes the acknowledgement to the watchdog

    fired = [e["time"] for e in wd.get("/api/v1/audit", run=run, kind="alert.firing") if e["rule"] == RULE]
    command = min((c for c in wd.get("/api/v1/commands", run=run) if c["rule"] == RULE and c["action"] == ACTION),
                  key=lambda c: c["seq"])
    ack = command["ack"]
    if ack is None or ack["status"] != "applied" or ack["step"] != seen_step:
        raise RuntimeError(f"{run}: the trainer saw clipping at step {seen_step}, the watchdog has ack {ack}")
    return Repeat(bad_at, bad_step, min(fired), command["issued_at"], command["delivered_at"], ack["at"], ack["step"], step_s)


# -- the report ---------------------------------------------------------------------------------


def stats(values: list[float], fmt: str) -> list[str]:
    p95 = statistics.quantiles(values, n=20, method="inclusive")[18] if len(values) > 1 else values[0]
    return [fmt.format(v) for v in (statistics.median(values), p95, max(values))]


def stage_rows(interval: float, repeats: list[Repeat]) -> list[list[str]]:
    stages = [
        ("bad step → alert firing", [r.fired_at - r.bad_at for r in repeats]),
        ("firing → command decided", [r.issued_at - r.fired_at for r in repeats]),
        ("decided → fetched by the agent's poll", [r.polled_at - r.issued_at for r in repeats]),
        ("fetched → applied (ack)", [r.applied_at - r.polled_at for r in repeats]),
        ("bad step → applied", [r.applied_at - r.bad_at for r in repeats]),
    ]
    rows = [[f"{interval:g} s" if i == 0 else "", name, *stats(v, "{:.2f} s")] for i, (name, v) in enumerate(stages)]
    rows.append(["", "bad step → applied, steps", *stats([r.applied_step - r.bad_step for r in repeats], "{:.0f}")])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 runs per scrape interval (about half a minute; rough numbers)")
    p.add_argument("--repeats", type=int, default=None, help="runs per scrape interval (default 10, --quick 2)")
    p.add_argument("--interval", default="0.5,2", help="the watchdog's scrape interval(s) in seconds, comma-separated "
                   "(default 0.5,2; 2 is the service's default)")
    args = p.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 10)
    intervals = [float(s) for s in args.interval.split(",")]

    torch.set_num_threads(1)
    logging.getLogger("gradwatch.agent").setLevel(logging.ERROR)  # each skip and command logs a warning
    rng = random.Random(0)
    print("\n".join(header_lines({
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "device": f"cpu ({os.cpu_count()} logical CPUs, shared by the trainer and the watchdog process)",
        "load avg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "model": f"MLP {DEPTH}x Linear({WIDTH},{WIDTH}) + head, batch {BATCH}, Adam; watch() defaults",
        "method": f"{repeats} runs per scrape interval; NaN gradients on {BAD_STEPS} consecutive steps; "
                  f"default pack, {RULE} → {ACTION}; agent poll {POLL_S:g} s",
    })))

    rows, round_rows = [], []
    with tempfile.TemporaryDirectory(prefix="gradwatch-latency-") as tmp:
        for interval in intervals:
            workdir = Path(tmp) / f"scrape-{interval:g}s"
            workdir.mkdir()
            with WatchdogProcess(workdir, None, interval) as wd:
                results = [
                    # Random phases: the agent's poll against the watchdog's rounds (attach_s; else each run would
                    # attach at the same phase, just after the previous run's poll), the bad steps against both.
                    run_once(wd, f"latency-{interval:g}s-{i}", seed=i, settle_s=interval + 1.0,
                             attach_s=rng.uniform(0, POLL_S), delay_s=rng.uniform(0, max(interval, POLL_S)))
                    for i in range(repeats)
                ]
                rounds = round_durations(wd.url)
            rows += stage_rows(interval, results)
            step_ms = statistics.median(r.step_s for r in results) * 1e3
            round_rows.append([f"{interval:g} s", f"{rounds['rounds']:.0f}", f"{rounds['round'] * 1e3:.1f} ms",
                               f"{rounds['evaluation'] * 1e3:.1f} ms", f"{step_ms:.1f} ms"])

    print("\n## Latency per stage (wall clock; the watchdog stamps a firing and its command with the round's start)")
    print(format_table(["scrape", "stage", "median", "p95", "max"], rows, "<<>>>"))
    print("\n## The watchdog's rounds (its /metrics, means over the whole service run) and the training step")
    print(format_table(["scrape", "rounds", "round mean", "evaluation mean", "training step (median)"], round_rows))
    print("\nload average at the end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
