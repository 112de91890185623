"""Small real stand-ins shared by the service and API tests: a settable clock and an agent-like /metrics endpoint."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import MetricsHandler

T0 = 1_700_000_000.0


class Clock:
    """A settable clock: tests move time by assigning ``t``, never by waiting."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeAgent:
    """A /metrics endpoint exporting gradwatch_step and gradwatch_loss for run ``r1``, values set by the test."""

    def __init__(self) -> None:
        registry = CollectorRegistry()
        self.step = Gauge("gradwatch_step", "step", ["run", "rank"], registry=registry).labels("r1", "0")
        self.loss = Gauge("gradwatch_loss", "loss", ["run", "rank"], registry=registry).labels("r1", "0")
        self.loss.set(1.0)
        # Not start_http_server: its 0.5 s shutdown poll would slow every test's teardown.
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), MetricsHandler.factory(registry))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/metrics"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
