"""How many runs one watchdog core can watch: rule evaluation throughput and the full round.

    python benchmarks/watchdog_throughput.py [--quick] [--runs N] [--rounds N] [--no-retention]

Goal (issue 3): 100 registered runs x 3,200 series each (a 400-tensor model x 8
per-layer metrics) scraped and evaluated against the default pack within one
5-second interval on one core.

Everything starts from a REAL agent exposition: a child process builds a
400-tensor model (100 residual blocks of LayerNorm(64) + Linear(64, 64)), attaches
``gradwatch.agent.watch(..., every=1, detail_every=1)``, trains 6 Adam steps with a
NaN loss at the third (the guard skips it, so every layer gets its non-finite
counter: 8 per-layer metrics, as in a fleet where runs once hit a NaN) and scrapes
its /metrics twice: before the NaN step ("healthy", 7 per-layer metrics) and after.
The watchdog side never imports torch.

1. Rule evaluation: a store holding N runs of that exposition, its history as 10
   minutes of 2-s scrapes leave it, evaluated with the default pack. Prints series,
   rules, seconds per evaluation and series x rules per second, plus the cost of each rule.
2. The full round: a separate server process serves the 100 expositions over real
   HTTP (one port per run, as 100 agents would); the watchdog process runs
   ``ScrapeSource.scrape_all`` + ``RuleEngine.eval`` round after round. Prints the
   first round (every target parsed in full) and the steady state (the parser's
   same-shape shortcut) against the 5-s goal, with the watchdog's CPU time and peak RSS.

The watchdog side of each part runs in its own process, pinned to one core
(``os.sched_setaffinity``, as ``taskset -c``); the server gets the other cores. Each
part's peak RSS is that process's own. See benchmarks/README.md for the method.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

from common import format_table, header_lines, mark

SCRAPE_S = 2.0  # the service's default interval, which the default pack's timings assume
HISTORY_S = 600.0  # "after ~10 minutes of scrapes"
GOAL_S = 5.0
GOAL_RUNS = 100
T0 = 1_700_000_000.0
CAPTURE_RUN = "captured"


# -- 1. a real agent's exposition (the only place torch is imported) --------------------------


def capture_main() -> None:
    """``--capture``: print ``{"healthy": text, "after_nan": text, ...}`` as JSON on stdout."""
    import httpx
    import torch
    from torch import nn

    import gradwatch.agent

    torch.set_num_threads(1)
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(64)
            self.fc = nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc(self.norm(x))

    model = nn.Sequential(*[Block() for _ in range(100)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    agent = gradwatch.agent.watch(model, opt, run=CAPTURE_RUN, port=0, every=1, detail_every=1)
    texts = {}
    try:
        for step in range(6):
            x = torch.randn(16, 64)
            loss = model(x).pow(2).mean()
            if step == 2:
                texts["healthy"] = httpx.get(agent.url).text
                loss = loss * float("nan")  # the guard skips this step; every layer counts its NaNs
            opt.zero_grad()
            loss.backward()
            opt.step()
            agent.observe(loss=loss)
        texts["after_nan"] = httpx.get(agent.url).text
    finally:
        agent.close()
    texts["tensors"] = sum(1 for _ in model.parameters())
    texts["torch"] = torch.__version__
    json.dump(texts, sys.stdout)


def capture_expositions() -> dict:
    out = subprocess.run([sys.executable, __file__, "--capture"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"capturing the agent's exposition failed (needs torch):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


# -- the value model: what varies between scrapes ----------------------------------------------

CONSTANT, NOISY, STEP = 0, 1, 2
NOISE_SIGMA = 0.1  # log-normal jitter: well inside every default rule's healthy range
STEPS_PER_SCRAPE = 20  # 10 optimizer steps a second

CONSTANT_METRICS = frozenset({
    "gradwatch_layer_depth", "gradwatch_learning_rate", "gradwatch_lr_scale", "gradwatch_clipping_active",
    "gradwatch_clip_threshold", "gradwatch_nonfinite_grads_total", "gradwatch_skipped_steps_total",
    "gradwatch_commands_applied_total",
})


def value_kind(name: str) -> int:
    """How a sample varies from scrape to scrape (see the README section for why)."""
    if name == "gradwatch_step":
        return STEP
    return CONSTANT if name in CONSTANT_METRICS else NOISY


def value_at(kind: int, base: float, scrape: int, noise: float) -> float:
    """The value of a sample at its ``scrape``-th scrape; ``noise`` is a N(0, 1) draw."""
    if kind == STEP:
        return base + STEPS_PER_SCRAPE * scrape
    if kind == NOISY:
        return base * math.exp(NOISE_SIGMA * noise)
    return base


# -- 2. rule evaluation on a synthetic store ---------------------------------------------------


def run_label(i: int) -> str:
    return f"bench-{i:03d}"


def build_store(text: str, runs: int, retention: bool, now: float):
    """A store holding ``runs`` copies of the exposition, with the history 10 minutes of scrapes leave.

    Points the store's retention would prune at once are not generated: the store
    ends up exactly as if every scrape had been added, in a fraction of the time.
    """
    from gradwatch.watchdog.engine import RuleEngine
    from gradwatch.watchdog.rules.loader import load_rules
    from gradwatch.watchdog.samples import SampleStore
    from gradwatch.watchdog.sources.parse import parse_exposition

    engine = RuleEngine(load_rules().rules)
    store = SampleStore()
    if retention:
        store.set_retention(engine.history_needed())
    parsed = parse_exposition(text)
    scrapes = int(HISTORY_S / SCRAPE_S)
    times = [now - SCRAPE_S * (scrapes - 1 - k) for k in range(scrapes)]  # one float per round, shared
    rng = random.Random(0)
    noise = [rng.gauss(0.0, 1.0) for _ in range(4099)]
    j = 0
    for i in range(runs):
        run = run_label(i)
        for (name, labels), base in zip(parsed.series, parsed.values):
            labels = tuple((k, run if k == "run" else v) for k, v in labels)
            kind = value_kind(name)
            keep = min(scrapes, int(store.retention_s(name) // SCRAPE_S) + 1)
            for k in range(scrapes - keep, scrapes):
                j += 1
                store.add(times[k], name, labels, value_at(kind, base, k, noise[j % 4099]))
    return engine, store


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pin_to(cores: set[int]) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)


def eval_part(text: str, runs: int, evals: int, retention: bool, core: int) -> dict:
    """In its own process: build the store, evaluate the default pack ``evals`` times."""
    pin_to({core})
    started = time.perf_counter()
    engine, store = build_store(text, runs, retention, T0)
    build_s = time.perf_counter() - started
    walls, cpus, per_rule = [], [], {r.name: [] for r in engine.rules}
    alerts = 0
    for k in range(evals):
        now = T0 + 0.5 * k  # within the last scrape's interval: the store does not change
        c0, w0 = time.process_time(), time.perf_counter()
        result = engine.eval(now, store)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        alerts += len(result.changed)
        for name, health in engine.health().items():
            per_rule[name].append(health.last_duration_s)
    return {
        "runs": runs,
        "series": store.series_count(),
        "points": store.point_count(),
        "rules": len(engine.rules),
        "kinds": {r.name: r.kind for r in engine.rules},
        "wall_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "per_rule_s": {name: statistics.median(v) for name, v in per_rule.items()},
        "alerts": alerts,
        "errors": {n: h.last_error for n, h in engine.health().items() if h.state == "err"},
        "build_s": build_s,
        "rss_mb": rss_mb(),
        "peak_rss_mb": peak_rss_mb(),
    }


# -- 3. the full round over HTTP ---------------------------------------------------------------


@dataclass
class Line:
    head: str  # a comment line, or a sample line up to (not including) its value
    kind: int  # CONSTANT, NOISY, STEP; -1 for a comment
    base: float


def template(text: str, run: str) -> list[Line]:
    """The exposition's lines with ``run``'s label: what a server renders values into."""
    lines = []
    for raw in text.split("\n"):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            lines.append(Line(line, -1, 0.0))
            continue
        head, _, value = line.rpartition(" ")
        head = head.replace(f'run="{CAPTURE_RUN}"', f'run="{run}"')
        lines.append(Line(head, value_kind(head.partition("{")[0]), float(value)))
    return lines


def serve_main(template_path: str, runs: int, cores: str) -> None:
    """``--serve``: one HTTP server per run, each rendering fresh values at every scrape.

    Prints the ports as a JSON list, then serves until stdin closes.
    """
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client.utils import floatToGoString

    pin_to({int(c) for c in cores.split(",")})
    with open(template_path) as f:
        text = f.read()

    def make_handler(lines: list[Line], seed: int) -> type[BaseHTTPRequestHandler]:
        rng = random.Random(seed)
        state = {"scrape": int(HISTORY_S / SCRAPE_S) - 1}  # carry on where the prefilled history ends

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like prometheus-client's server

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                state["scrape"] += 1
                scrape, gauss = state["scrape"], rng.gauss
                out = []
                for ln in lines:
                    if ln.kind < 0:
                        out.append(ln.head)
                    else:
                        v = value_at(ln.kind, ln.base, scrape, gauss(0.0, 1.0) if ln.kind == NOISY else 0.0)
                        out.append(f"{ln.head} {floatToGoString(v)}")
                body = ("\n".join(out) + "\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        return Handler

    servers = []
    for i in range(runs):
        server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(template(text, run_label(i)), seed=i))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    print(json.dumps([s.server_address[1] for s in servers]), flush=True)
    sys.stdin.read()  # the benchmark closes our stdin when it is done


def round_part(text: str, runs: int, rounds: int, retention: bool, core: int, server_cores: str) -> dict:
    """In its own process, pinned to ``core``: prefill history, then scrape + evaluate ``rounds`` times."""
    import gc

    from gradwatch.watchdog.schema import Registration
    from gradwatch.watchdog.sources.scrape import ScrapeSource
    from gradwatch.watchdog.sources.targets import TargetRegistry

    pin_to({core})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "exposition.txt")
        with open(path, "w") as f:
            f.write(text)
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", path, "--runs", str(runs), "--server-cores", server_cores],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            ports = json.loads(server.stdout.readline())
            # History before the first HTTP round, ending one interval before it.
            engine, store = build_store(text, runs, retention, T0 - SCRAPE_S)
            gc.collect()
            rss_prefilled = rss_mb()
            registry = TargetRegistry()
            for i, port in enumerate(ports):
                url = f"http://127.0.0.1:{port}/metrics"
                registry.register(Registration(run=run_label(i), rank=0, metrics_url=url), T0 - SCRAPE_S)
            source = ScrapeSource(registry, store, timeout_s=GOAL_S)
            rows = []
            try:
                for k in range(rounds):
                    now = T0 + SCRAPE_S * k  # simulated clock: rounds run back to back
                    c0, w0 = time.process_time(), time.perf_counter()
                    scraped = source.scrape_all(now)
                    w1 = time.perf_counter()
                    result = engine.eval(now, store)
                    w2, c2 = time.perf_counter(), time.process_time()
                    rows.append({
                        "scrape_s": w1 - w0, "eval_s": w2 - w1, "wall_s": w2 - w0, "cpu_s": c2 - c0,
                        "ok": scraped.ok, "failed": scraped.failed, "samples": scraped.samples,
                        "alerts": len(result.changed), "errors": dict(result.errors),
                        # the parser's own counter: a full parse is a shape change (not the shortcut)
                        "full_parses": sum(p.full_parses for p in source._parsers.values()),
                    })
            finally:
                source.close()
        finally:
            server.stdin.close()
            server.wait(timeout=30)
    return {
        "rows": rows,
        "series": store.series_count(),
        "points": store.point_count(),
        "rss_prefilled_mb": rss_prefilled,
        "rss_mb": rss_mb(),
        "peak_rss_mb": peak_rss_mb(),
        "series_per_run": store.series_count() // runs,
    }


# -- the report --------------------------------------------------------------------------------


def in_child(fn: Callable, *args):
    """Run ``fn(*args)`` in a fresh interpreter, so its peak RSS is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def p95(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_rate(x: float) -> str:
    return f"{x / 1e6:.1f} M" if x >= 1e6 else f"{x / 1e3:.0f} k"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer evaluations and rounds (about a minute)")
    ap.add_argument("--runs", type=int, default=GOAL_RUNS, help="runs in the full round (and the largest store)")
    ap.add_argument("--rounds", type=int, help="HTTP rounds (default 30, --quick 6)")
    ap.add_argument("--no-retention", action="store_true",
                    help="keep every series for the store's max_age_s (the behaviour before set_retention)")
    ap.add_argument("--parts", default="eval,round", help="eval, round or both (default)")
    ap.add_argument("--capture", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--server-cores", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.capture:
        return capture_main()
    if args.serve:
        return serve_main(args.serve, args.runs, args.server_cores)

    retention = not args.no_retention
    rounds = args.rounds or (6 if args.quick else 30)
    evals = 3 if args.quick else 10
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    core, server_cores = cores[0], ",".join(map(str, cores[1:] or cores))
    parts = set(args.parts.split(","))

    captured = capture_expositions()
    healthy, after_nan = captured["healthy"], captured["after_nan"]
    print("\n".join(header_lines({
        "cpus": f"{len(cores)} usable; watchdog pinned to core {core}, server on {server_cores}",
        "load avg": " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (other processes share these cores)",
        "agent": f"real agent (torch {captured['torch']}), {captured['tensors']} tensors",
        "retention": "per metric, from RuleEngine.history_needed()" if retention else "off: max_age_s for every series",
        "history": f"{HISTORY_S / 60:g} min of {SCRAPE_S:g}-s scrapes",
    })))

    if "eval" in parts:
        print("\n## Rule evaluation: default pack, one core\n")
        sizes = sorted({1, 10, args.runs})
        cases = [("healthy", healthy, n) for n in sizes] + [("after NaN", after_nan, n) for n in sizes]
        rows, biggest = [], None
        for label, text, n in cases:
            print(f"  building and evaluating {n} runs ({label}) ...", file=sys.stderr, flush=True)
            r = in_child(eval_part, text, n, evals, retention, core)
            throughput = r["series"] * r["rules"] / r["wall_s"]
            rows.append([
                label, str(n), f"{r['series']:,}", f"{r['points']:,}", str(r["rules"]), fmt_s(r["wall_s"]),
                fmt_s(r["cpu_s"]), fmt_rate(throughput), f"{r['peak_rss_mb']:,.0f} MB", str(r["alerts"]),
            ])
            if r["errors"]:
                print(f"  rule errors: {r['errors']}", file=sys.stderr)
            if label == "after NaN" and n == args.runs:
                biggest = r
        print(format_table(
            ["exposition", "runs", "series", "points held", "rules", "s/eval", "cpu/eval", "series×rules/s",
             "peak RSS", "alerts"],
            rows,
        ))
        print(f"\n(median of {evals} evaluations; alerts: transitions seen, 0 expected on these healthy values)")
        if biggest:
            print(f"\nPer rule, {biggest['runs']} runs after a NaN step ({biggest['series']:,} series):\n")
            print(format_table(
                ["rule", "kind", "ms/eval", "share"],
                [[name, biggest["kinds"][name], f"{s * 1000:.1f}", f"{s / biggest['wall_s']:.0%}"]
                 for name, s in biggest["per_rule_s"].items()],
            ))

    if "round" in parts:
        print(f"\n## Full round: {args.runs} runs scraped over HTTP + default pack, watchdog on one core\n")
        print("  running rounds ...", file=sys.stderr, flush=True)
        r = in_child(round_part, after_nan, args.runs, rounds, retention, core, server_cores)
        rows = r["rows"]
        first, steady = rows[0], rows[1:]
        healthy_rounds = all(x["ok"] == args.runs and not x["failed"] for x in rows)
        shortcut = all(x["full_parses"] == args.runs for x in rows)

        table = [["first round (full parses)", fmt_s(first["scrape_s"]), fmt_s(first["eval_s"]),
                  fmt_s(first["wall_s"]), fmt_s(first["cpu_s"]), mark(first["wall_s"] <= GOAL_S)]]
        if steady:
            med = {k: statistics.median(x[k] for x in steady) for k in ("scrape_s", "eval_s", "wall_s", "cpu_s")}
            hi = {k: p95([x[k] for x in steady]) for k in ("scrape_s", "eval_s", "wall_s", "cpu_s")}
            table.append([f"steady median ({len(steady)} rounds)", fmt_s(med["scrape_s"]), fmt_s(med["eval_s"]),
                          fmt_s(med["wall_s"]), fmt_s(med["cpu_s"]), mark(med["wall_s"] <= GOAL_S)])
            table.append(["steady p95", fmt_s(hi["scrape_s"]), fmt_s(hi["eval_s"]), fmt_s(hi["wall_s"]),
                          fmt_s(hi["cpu_s"]), mark(hi["wall_s"] <= GOAL_S)])
        print(format_table(["round", "scrape", "eval", "wall", "cpu", f"wall ≤ {GOAL_S:g} s"], table))
        print()
        print(format_table(["measure", "value"], [
            ["runs × series per run", f"{args.runs} × {r['series_per_run']:,} = {r['series']:,} series"],
            ["samples per round", f"{rows[-1]['samples']:,}"],
            ["every target scraped every round", mark(healthy_rounds)],
            ["steady rounds took the parser's shortcut", mark(shortcut and len(rows) > 1)],
            ["alerts (0 expected)", str(sum(x["alerts"] for x in rows))],
            ["points held at the end", f"{r['points']:,}"],
            ["RSS after the history was filled", f"{r['rss_prefilled_mb']:,.0f} MB"],
            ["peak RSS of the watchdog process", f"{r['peak_rss_mb']:,.0f} MB"],
        ], align="<<"))
        errors = {e for x in rows for e in x["errors"].values()}
        if errors:
            print(f"\nrule errors: {errors}")
        if steady:
            at_scale = args.runs >= GOAL_RUNS and r["series_per_run"] >= 3200

            def verdict(seconds: float) -> list[str]:
                return [fmt_s(seconds), mark(seconds <= GOAL_S) if at_scale else "n/a (fewer runs)"]

            print(f"\nGoal: {GOAL_RUNS} runs × 3,200 series scraped and evaluated within one {GOAL_S:g}-s interval "
                  "on one core.\n")
            print(format_table(["", "time", "goal"], [
                ["steady state p95, CPU time (one core's work)", *verdict(hi["cpu_s"])],
                ["steady state p95, wall time on this machine", *verdict(hi["wall_s"])],
                ["first round, wall (every exposition parsed in full)", *verdict(first["wall_s"])],
            ]))
            print("\nload average at the end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
