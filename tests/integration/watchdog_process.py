"""``gradwatch serve`` as a subprocess for integration tests, and small helpers to talk to it."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.integration.servers import Server, free_port

INTERVAL = "0.5"  # the watchdog's round in tests; the default pack's `for` durations are counted in seconds


def start_watchdog(
    workdir: Path, *args: str, name: str = "watchdog", attempts: int = 3, port: int | None = None
) -> Server:
    """``gradwatch serve`` in a subprocess on ``port`` (default: a free loopback port); returns once ``/healthz`` is 200."""
    workdir.mkdir(parents=True, exist_ok=True)
    fixed = port
    for attempt in range(attempts):
        port = fixed or free_port()
        log_path = workdir / f"{name}-{attempt}.log"
        with open(log_path, "wb") as log:
            command = [sys.executable, "-m", "gradwatch.watchdog.cli", "serve", "--port", str(port),
                       "--scrape-interval", INTERVAL, *args]
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir)
        server = Server(name, process, f"http://127.0.0.1:{port}", log_path)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/healthz", timeout=1).json()["status"] == "ok":
                    return server
            time.sleep(0.05)
        server.stop()
        if "cannot listen" not in server.log_tail():  # only a port taken meanwhile is worth a retry
            break
    raise RuntimeError(f"gradwatch serve did not become healthy:\n{server.log_tail()}")


def api(server: Server, path: str, **params) -> list | dict:
    response = httpx.get(f"{server.url}{path}", params=params, timeout=5)
    response.raise_for_status()
    return response.json()


def wait_until(what: str, check, timeout: float = 15.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


