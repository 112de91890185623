"""The servers the demo runs beside its training job, as they would run in production.

``WatchdogProcess`` is ``gradwatch serve`` in a child process on a free loopback port,
with a generated command secret and its state in the demo's directory.
``NotificationSink`` is the webhook endpoint the watchdog notifies: a small loopback
HTTP server that keeps every payload, standing in for the team's chat or pager.
Both are context managers, so an exception or Ctrl-C never leaves a process behind.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class NotificationSink:
    """Receives the watchdog's webhook notifications; ``received`` holds (time, payload) pairs."""

    def __init__(self, log_path: Path) -> None:
        self.received: list[tuple[float, dict]] = []
        self.on_receive = None  # called with each payload (from the server's thread)
        self._log_path = log_path
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = {"unparsed": body.decode(errors="replace")}
                sink._keep(payload)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self._server.server_port}/notify"
        self._thread = threading.Thread(target=self._server.serve_forever, name="demo-webhook", daemon=True)

    def _keep(self, payload: dict) -> None:
        self.received.append((time.time(), payload))
        if self.on_receive is not None:
            self.on_receive(payload)
        with open(self._log_path, "a") as log:
            log.write(json.dumps(payload) + "\n")

    def __enter__(self) -> NotificationSink:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


class WatchdogProcess:
    """``gradwatch serve`` in a child process (``config`` None: the default rule pack, no notifiers);
    ``url`` once started. Agents pass ``secret_file`` to ``watch()``. Stops on exit (SIGTERM, then SIGKILL)."""

    def __init__(
        self, workdir: Path, config: Path | None, interval_s: float, poll_s: float | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.config = config
        self.interval_s = interval_s
        self.poll_s = poll_s  # how often agents are told to poll (None: the service's default, 1 s)
        self.settings = settings or {}  # more service settings, as GRADWATCH_* variables (e.g. scaled_settings())
        self.secret_file = workdir / "command-secret"
        self.log_path = workdir / "watchdog.log"
        self.url = ""
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> WatchdogProcess:
        self.secret_file.write_text(secrets.token_hex(32))
        self.secret_file.chmod(0o600)
        for _ in range(3):  # another process may take the free port before the child binds it
            port = free_port()
            self.url = f"http://{HOST}:{port}"
            with open(self.log_path, "ab") as log:
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "gradwatch.watchdog.cli", "serve", "--host", HOST, "--port", str(port),
                     "--db", str(self.workdir / "gradwatch.db"), "--scrape-interval", f"{self.interval_s:g}",
                     *(["--config", str(self.config)] if self.config is not None else [])],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=self._environ(),
                )
            if self._wait_healthy():
                return self
            self.__exit__()
        raise RuntimeError(f"the watchdog did not start; its log:\n{self.log_path.read_text()[-2000:]}")

    def _environ(self) -> dict[str, str]:
        """The user's environment with this service's settings instead of any GRADWATCH_* there."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
        env["GRADWATCH_SECRET_FILE"] = str(self.secret_file)
        if self.poll_s is not None:
            env["GRADWATCH_POLL_INTERVAL"] = f"{self.poll_s:g}"
        env.update({f"GRADWATCH_{name.upper()}": value for name, value in self.settings.items()})
        return env

    def _wait_healthy(self, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._process.poll() is None:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def get(self, path: str, **params) -> list | dict:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=5)
        response.raise_for_status()
        return response.json()

    def __exit__(self, *exc) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


