"""Scrape flood: clients scraping the agent's /metrics back to back must not slow training.

    python benchmarks/faults/scrape_flood.py [--quick]
    (or through benchmarks/fault_load.py, which prints every fault module's rows in one table)

A 406-tensor model (100 pre-norm residual blocks of LayerNorm + Linear(64, 64), Adam,
batch 128, one thread) trains under ``gradwatch.agent.watch`` (default settings): its
exposition is about 3,300 lines, and its step is mostly op dispatch, the kind of step a
thread holding the GIL slows most. Four loads, interleaved in rounds (each round runs
every load once, in a shuffled order, so drift in the machine's load falls on all alike):

- ``unloaded``: nothing else runs;
- ``1 scraper`` / ``4 scrapers``: separate processes, each scraping back to back
  (a new connection, the whole body read, again at once);
- ``4 busy``: four processes spinning on the CPU, never touching the agent: what four
  scraping clients cost the 2-core machine whatever the agent does.

Step time is wall-clock per optimizer step (forward, backward, step), pooled over rounds.
Goals (issue 13): with one scraper, p50 and p99 within 1.05x of unloaded; with four, no
slower than with four busy processes (within 1.05x: the noise between two equal loads).
The scrape rate served and the threads 500 idle connections add are shown as well.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch
from torch import nn

import gradwatch.agent

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common
from common import format_table, header_lines, mark

Row = dict  # {"scenario", "measure", "value", "goal", "met"} (benchmarks/fault_load.py's contract)

GOAL_ONE = 1.05
GOAL_FOUR = 1.05

SCRAPER = r"""
import http.client, signal, sys
host, port = sys.argv[1], int(sys.argv[2])
n = 0
def done(*_):
    print(n, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
while True:
    try:
        c = http.client.HTTPConnection(host, port, timeout=10)
        c.request("GET", "/metrics", headers={"User-Agent": "flood/1"})
        r = c.getresponse()
        if r.status == 200:
            r.read()
            n += 1
        else:
            r.read()
        c.close()
    except OSError:
        pass
"""
BUSY = r"""
import signal, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
x = 0
while True:
    x += 1
"""


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(self.norm(x))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[Block(64) for _ in range(100)], nn.Linear(64, 10))


class Trainer:
    def __init__(self) -> None:
        self.model = build_model()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.agent = gradwatch.agent.watch(self.model, self.opt, run="flood", port=0)
        gen = torch.Generator().manual_seed(1)
        self.batches = [(torch.randn(128, 64, generator=gen), torch.randint(0, 10, (128,), generator=gen)) for _ in range(8)]
        self.i = 0

    def step(self) -> float:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        started = time.perf_counter()
        self.opt.zero_grad()
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        self.agent.observe(loss=loss)
        self.opt.step()
        return time.perf_counter() - started

    def close(self) -> None:
        self.agent.close()


def _clients(kind: str, n: int, url: str) -> list[subprocess.Popen]:
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    code = SCRAPER if kind == "scraper" else BUSY
    return [
        subprocess.Popen([sys.executable, "-c", code, host, port], stdout=subprocess.PIPE, text=True)
        for _ in range(n)
    ]


def _stop(procs: list[subprocess.Popen]) -> int:
    """Stop the clients; the scrapes they completed, all together."""
    total = 0
    for p in procs:
        p.terminate()
    for p in procs:
        out, _ = p.communicate(timeout=10)
        total += int(out.strip() or 0) if out.strip().isdigit() else 0
    return total


LOADS = {"unloaded": ("", 0), "1 scraper": ("scraper", 1), "4 scrapers": ("scraper", 4), "4 busy": ("busy", 4)}


def measure(trainer: Trainer, rounds: int, steps: int, settle_s: float) -> tuple[dict[str, list[float]], dict[str, float]]:
    times: dict[str, list[float]] = {name: [] for name in LOADS}
    rates: dict[str, list[float]] = {name: [] for name in LOADS}
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(LOADS)
        rng.shuffle(order)
        for name in order:
            kind, n = LOADS[name]
            procs = _clients(kind, n, trainer.agent.url) if n else []
            try:
                time.sleep(settle_s)  # the clients start (an interpreter each) and reach their loop
                for _ in range(3):
                    trainer.step()
                started = time.perf_counter()
                times[name] += [trainer.step() for _ in range(steps)]
                elapsed = time.perf_counter() - started
            finally:
                served = _stop(procs)
            if kind == "scraper":
                rates[name].append(served / (elapsed + settle_s))
    return times, {name: sum(r) / len(r) for name, r in rates.items() if r}


def idle_connection_threads(url: str, n: int = 500) -> tuple[int, bool]:
    """Threads the process gains while ``n`` connections sit idle on the agent, and whether a scrape still succeeds."""
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    before = threading.active_count()
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection((host, int(port)), timeout=5)
            socks.append(s)
        time.sleep(0.5)
        during = threading.active_count()
        try:
            ok = urllib.request.urlopen(url, timeout=10).status == 200
        except OSError:
            ok = False
    finally:
        for s in socks:
            s.close()
    return during - before, ok


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(quick: bool) -> list[Row]:
    torch.set_num_threads(1)
    trainer = Trainer()
    try:
        for _ in range(10):
            trainer.step()
        rounds, steps, settle = (1, 20, 0.5) if quick else (5, 60, 1.0)
        times, rates = measure(trainer, rounds, steps, settle)
        added, scrape_ok = idle_connection_threads(trainer.agent.url, 100 if quick else 500)
    finally:
        trainer.close()
    p = {name: (_pct(t, 0.5) * 1e3, _pct(t, 0.99) * 1e3) for name, t in times.items()}
    rows: list[Row] = []

    def ratio_row(scenario: str, load: str, base: str, q: int, goal: float) -> None:
        r = p[load][q] / p[base][q]
        rows.append(
            {
                "scenario": scenario,
                "measure": f"step {'p50' if q == 0 else 'p99'} vs {base}",
                "value": f"{r:.3f}x ({p[load][q]:.1f} / {p[base][q]:.1f} ms)",
                "goal": f"<= {goal:.2f}x",
                "met": r <= goal,
            }
        )

    ratio_row("scrape flood, 1 client", "1 scraper", "unloaded", 0, GOAL_ONE)
    ratio_row("scrape flood, 1 client", "1 scraper", "unloaded", 1, GOAL_ONE)
    ratio_row("scrape flood, 4 clients", "4 scrapers", "4 busy", 0, GOAL_FOUR)
    ratio_row("scrape flood, 4 clients", "4 scrapers", "4 busy", 1, GOAL_FOUR)
    for load in ("1 scraper", "4 scrapers"):
        rows.append(
            {"scenario": f"scrape flood, {load.split()[0]} client(s)", "measure": "scrapes served /s",
             "value": f"{rates[load]:.0f}", "goal": "", "met": None}
        )
    n_idle = 100 if quick else 500
    rows.append(
        {"scenario": f"{n_idle} idle connections", "measure": "threads added; a scrape still answered",
         "value": f"{added}; {'yes' if scrape_ok else 'no'}", "goal": "0; yes", "met": added <= 0 and scrape_ok}
    )
    return rows


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg()) + " (load average 1/5/15 min)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round: a smoke run, rough numbers")
    args = parser.parse_args(argv)
    cpus = str(len(os.sched_getaffinity(0)))
    print("\n".join(header_lines({"torch": torch.__version__, "threads": "1", "cpus": cpus, "load": _load()})))
    rows = run(args.quick)
    print(format_table(["scenario", "measure", "value", "goal", "met"],
                       [[r["scenario"], r["measure"], r["value"], r["goal"], mark(r["met"])] for r in rows],
                       align="<<>><"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
