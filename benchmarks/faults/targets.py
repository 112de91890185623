"""Hostile scrape targets against ``gradwatch serve``: round times, scrape counts and RSS (issue 13, items 3, 6, 16).

    python -m benchmarks.faults.targets [--quick]      (from the repository root)

Imported by ``benchmarks/fault_load.py`` through :func:`run`. Every scenario starts a
real ``gradwatch serve`` subprocess on loopback with the default 2-s interval (so the
scrape deadline is 2 s) beside one healthy target, adds the attack, and reads the
watchdog's own ``/metrics`` over a window:

1. **slow target**: a target sending its answer, status line and headers included,
   at 1 byte/s. The healthy run's scrapes in the window, the mean round time,
   ``/healthz`` at the end, and how long SIGTERM takes to end the process.
2. **64 black-holed targets**: 64 registrations whose address accepts connections and
   never answers. Mean and worst round time, the healthy run's scrapes.
3. **label churn**: one target serving 200k series whose labels change every scrape
   (over the 50k sample limit), then one serving 10k churning series under a 40k
   per-target series limit (set for the run, so the limit, not the machine, is what
   stops it, after four scrapes). The watchdog's RSS over the window
   and the mean round time.
4. **5,000 registrations**: 5,000 stale registrations (a closed port) restored from the
   store at start, retried every 30 s. Mean and worst round time against the interval.

Figures are printed as measured; ``met`` compares them with the goal in the same row.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script or from fault_load.py: the hostile targets live with the tests
    sys.path.insert(0, str(ROOT))

from tests.hostile import black_hole, serving, trickling  # noqa: E402
from tests.integration.servers import Server, free_port  # noqa: E402
from tests.integration.watchdog_process import start_watchdog, wait_until  # noqa: E402

Row = dict
INTERVAL_S = 2.0
HEALTHY_BODY = b'gradwatch_step{run="healthy",rank="0"} 1\ngradwatch_loss{run="healthy",rank="0"} 0.5\n'


@contextlib.contextmanager
def _environment(**settings: str) -> Iterator[None]:
    """``GRADWATCH_*`` settings for the watchdog subprocess started inside the block."""
    names = {f"GRADWATCH_{k.upper()}": v for k, v in settings.items()}
    saved = {n: os.environ.get(n) for n in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Watchdog:
    """A running ``gradwatch serve`` and what the benchmark reads from it."""

    def __init__(self, workdir: Path, db: Path, **settings: str) -> None:
        with _environment(**settings):
            self.server: Server = start_watchdog(workdir, "--db", str(db), "--scrape-interval", str(INTERVAL_S),
                                                 "--log-level", "warning")
        self.url = self.server.url

    def register(self, run: str, url: str, rank: int = 0) -> None:
        body = {"run": run, "rank": rank, "metrics_url": url}
        response = httpx.post(f"{self.url}/api/v1/runs", json=body, timeout=10)
        response.raise_for_status()

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def health(self) -> str:
        return httpx.get(f"{self.url}/healthz", timeout=10).json()["status"]

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.server.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def sigterm_s(self) -> float:
        """Seconds from SIGTERM to the process's exit (it is killed after 60)."""
        started = time.monotonic()
        self.server.process.send_signal(signal.SIGTERM)
        try:
            self.server.process.wait(60)
        except subprocess.TimeoutExpired:
            self.server.process.kill()
        return time.monotonic() - started

    def stop(self) -> None:
        self.server.stop()


class Window:
    """The watchdog's round and scrape counters between two readings."""

    def __init__(self, before: dict, after: dict, seconds: float) -> None:
        self.before, self.after, self.seconds = before, after, seconds

    def delta(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return self.after.get(key, 0.0) - self.before.get(key, 0.0)

    @property
    def rounds(self) -> float:
        return self.delta("gradwatch_watchdog_round_duration_seconds_count")

    @property
    def mean_round_s(self) -> float:
        return self.delta("gradwatch_watchdog_round_duration_seconds_sum") / max(self.rounds, 1.0)

    def rounds_over(self, bound: str) -> float:
        """Rounds longer than ``bound`` seconds (a histogram bucket bound, e.g. "2.5")."""
        return self.rounds - self.delta("gradwatch_watchdog_round_duration_seconds_bucket", le=bound)

    def scrapes(self, run: str) -> float:
        return self.delta("gradwatch_watchdog_scrapes_total", run=run, rank="0")


def _observe(watchdog: Watchdog, seconds: float, during: Callable[[float], None] | None = None) -> Window:
    before = watchdog.metrics()
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        if during is not None:
            during(elapsed)
        time.sleep(min(1.0, seconds - elapsed))
    return Window(before, watchdog.metrics(), time.monotonic() - started)


def _row(scenario: str, measure: str, value: str, goal: str = "", met: bool | None = None) -> Row:
    return {"scenario": scenario, "measure": measure, "value": value, "goal": goal, "met": met}


def _first_round(watchdog: Watchdog, run: str) -> None:
    wait_until(f"the first scrape of {run}", lambda: watchdog.metrics().get(
        ("gradwatch_watchdog_scrapes_total", (("rank", "0"), ("run", run))), 0) >= 1, timeout=30)


def slow_target(tmp: Path, window_s: float) -> list[Row]:
    name = "slow target (1 byte/s)"
    with contextlib.ExitStack() as stack:
        healthy, slow = serving(HEALTHY_BODY), trickling(every_s=1.0)
        stack.callback(healthy.stop)
        stack.callback(slow.stop)
        watchdog = Watchdog(tmp / "slow", tmp / "slow.db")
        stack.callback(watchdog.stop)
        watchdog.register("healthy", healthy.url)
        _first_round(watchdog, "healthy")
        watchdog.register("slow", slow.url)
        window = _observe(watchdog, window_s)
        health = watchdog.health()
        sigterm = watchdog.sigterm_s()
    expected = window.seconds / INTERVAL_S
    scrapes = window.scrapes("healthy")
    return [
        _row(name, f"healthy run's scrapes in {window.seconds:.0f} s", f"{scrapes:.0f}",
             f"≥ {0.9 * expected:.0f} (one a {INTERVAL_S:g}-s round; was 1 in 40 s)", scrapes >= 0.9 * expected),
        _row(name, "mean round time", f"{window.mean_round_s:.3f} s", f"≤ {INTERVAL_S + 0.5:g} s (deadline + grace)",
             window.mean_round_s <= INTERVAL_S + 0.5),
        _row(name, "/healthz at the end", health, "ok (was 503)", health == "ok"),
        _row(name, "SIGTERM to exit", f"{sigterm:.1f} s", "≤ 5 s (was 48.5 s)", sigterm <= 5.0),
    ]


def black_holes(tmp: Path, window_s: float, count: int = 64) -> list[Row]:
    name = f"{count} black-holed targets"
    with contextlib.ExitStack() as stack:
        healthy, hole = serving(HEALTHY_BODY), black_hole(backlog=4 * count)
        stack.callback(healthy.stop)
        stack.callback(hole.stop)
        watchdog = Watchdog(tmp / "holes", tmp / "holes.db")
        stack.callback(watchdog.stop)
        watchdog.register("healthy", healthy.url)
        _first_round(watchdog, "healthy")
        for i in range(count):
            watchdog.register(f"hole-{i}", hole.url)
        window = _observe(watchdog, window_s)
    expected = window.seconds / INTERVAL_S
    scrapes = window.scrapes("healthy")
    over = window.rounds_over("2.5")
    return [
        _row(name, "mean round time", f"{window.mean_round_s:.3f} s", f"≤ {INTERVAL_S + 0.5:g} s (deadline + grace; was 8 s)",
             window.mean_round_s <= INTERVAL_S + 0.5),
        _row(name, "rounds over 2.5 s", f"{over:.0f} of {window.rounds:.0f}", "0", over == 0),
        _row(name, f"healthy run's scrapes in {window.seconds:.0f} s", f"{scrapes:.0f}", f"≥ {0.8 * expected:.0f}",
             scrapes >= 0.8 * expected),
    ]


def _churning(series: int) -> Callable[[], bytes]:
    """An exposition of ``series`` gradwatch series whose ``step`` label changes every scrape."""
    scrape = itertools.count()

    def body() -> bytes:
        n = next(scrape)
        return b"".join(b'gradwatch_grad_norm{layer="l%d",step="%d"} 1\n' % (i, n) for i in range(series))

    return body


def label_churn(tmp: Path, window_s: float, series: int, series_limit: int = 100_000) -> list[Row]:
    name = f"label churn ({series // 1000}k series)"
    with contextlib.ExitStack() as stack:
        healthy, churner = serving(HEALTHY_BODY), serving(_churning(series))
        stack.callback(healthy.stop)
        stack.callback(churner.stop)
        limits = {"target_sample_limit": str(min(50_000, series_limit)), "target_series_limit": str(series_limit)}
        watchdog = Watchdog(tmp / f"churn{series}", tmp / f"churn{series}.db", **limits)
        stack.callback(watchdog.stop)
        watchdog.register("healthy", healthy.url)
        _first_round(watchdog, "healthy")
        start_rss = watchdog.rss_mb()
        watchdog.register("churn", churner.url)
        readings: list[float] = []
        window = _observe(watchdog, window_s, lambda _: readings.append(watchdog.rss_mb()))
        end_rss = watchdog.rss_mb()
        [status] = httpx.get(f"{watchdog.url}/api/v1/runs", params={"run": "churn"}, timeout=10).json()
        series_held = watchdog.metrics().get(("gradwatch_watchdog_series", ()), float("nan"))
    mid_rss = readings[len(readings) // 2]
    growth = end_rss - start_rss
    return [
        _row(name, "watchdog RSS: start / middle / end", f"{start_rss:.0f} / {mid_rss:.0f} / {end_rss:.0f} MB",
             "(was 224 MB → 1.6 GB in 60 s)", None),
        _row(name, "RSS growth over the window", f"{growth:+.0f} MB", "≤ 200 MB", growth <= 200),
        _row(name, "series held at the end", f"{series_held:,.0f}",
             f"≤ {series_limit + 2:,} (target_series_limit {series_limit:,} + healthy)", series_held <= series_limit + 2),
        _row(name, "mean round time", f"{window.mean_round_s:.3f} s", f"≤ {INTERVAL_S:g} s (was 6-10 s)",
             window.mean_round_s <= INTERVAL_S),
        _row(name, "the churning target's last_error", (status["last_error"] or "none")[:60], "", None),
    ]


def _stale_store(db: Path, count: int, seen_at: float) -> None:
    """``count`` registrations at a closed port, last seen at ``seen_at``, written as a stopped watchdog left them."""
    from gradwatch.watchdog.schema import Registration
    from gradwatch.watchdog.store import Store

    dead = f"http://127.0.0.1:{free_port()}/metrics"
    store = Store(str(db))
    try:
        with store.transaction():
            for i in range(count):
                store.register_run(Registration(run=f"stale-{i:05d}", rank=0, metrics_url=dead), seen_at)
    finally:
        store.close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET stale=1")


def registrations(tmp: Path, window_s: float, count: int = 5000) -> list[Row]:
    name = f"{count:,} stale registrations"
    db = tmp / "stale.db"
    _stale_store(db, count, time.time() - 600)
    with contextlib.ExitStack() as stack:
        healthy = serving(HEALTHY_BODY)
        stack.callback(healthy.stop)
        watchdog = Watchdog(tmp / "stale", db)
        stack.callback(watchdog.stop)
        watchdog.register("healthy", healthy.url)
        _first_round(watchdog, "healthy")
        window = _observe(watchdog, window_s)
    over = window.rounds_over("2.5")
    expected = window.seconds / INTERVAL_S
    scrapes = window.scrapes("healthy")
    return [
        _row(name, "mean round time", f"{window.mean_round_s:.3f} s", f"≤ {INTERVAL_S:g} s (the interval; was 5-8 s)",
             window.mean_round_s <= INTERVAL_S),
        _row(name, "rounds over 2.5 s", f"{over:.0f} of {window.rounds:.0f}", "0", over == 0),
        _row(name, f"healthy run's scrapes in {window.seconds:.0f} s", f"{scrapes:.0f}", f"≥ {0.9 * expected:.0f}",
             scrapes >= 0.9 * expected),
    ]


def run(quick: bool) -> list[Row]:
    """Every scenario; ``quick`` shortens the windows (and the registrations) for a smoke run."""
    window, churn_window = (6.0, 6.0) if quick else (40.0, 60.0)
    with tempfile.TemporaryDirectory(prefix="gradwatch-targets-") as tmp:
        path = Path(tmp)
        rows = slow_target(path, window)
        rows += black_holes(path, window)
        rows += label_churn(path, churn_window, 200_000)
        rows += label_churn(path, churn_window, 10_000, series_limit=40_000)
        # Quick: fewer registrations, and a window shorter than the 30-s stale retry.
        rows += registrations(path, 6.0 if quick else 70.0, 1000 if quick else 5000)
    return rows


def main() -> None:
    import argparse

    from benchmarks.common import format_table, header_lines, mark

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows, fewer registrations (a smoke run)")
    args = parser.parse_args()
    print("\n".join(header_lines({"watchdog": f"gradwatch serve, --scrape-interval {INTERVAL_S:g} (deadline 2 s)"})))
    rows = run(args.quick)
    table = [[r["scenario"], r["measure"], r["value"], r["goal"], mark(r["met"])] for r in rows]
    print(format_table(["scenario", "measure", "value", "goal", "met"], table, "<<>><"))


if __name__ == "__main__":
    main()
