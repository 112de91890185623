"""Start real Prometheus and Alertmanager binaries for integration tests, loopback only.

Each server gets a free port, its own directory under the test's ``tmp_path`` and a
log file; ``start_*`` returns once ``/-/ready`` answers, and the returned handle
stops the process (SIGTERM, then SIGKILL) — use it as a context manager or from a
fixture's teardown so the server dies even when the test fails.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ALERTMANAGER_BIN = "prometheus-alertmanager"  # Debian's name for alertmanager
PROMETHEUS_BIN = "prometheus"


def require_binary(name: str) -> str:
    """The binary's path, or skip the test saying what to install."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install -y --no-install-recommends prometheus prometheus-alertmanager)")
    return path


def free_port() -> int:
    """A port free on 127.0.0.1 right now (another process may still take it: callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running server process; ``url`` is its base URL (no trailing slash)."""

    def __init__(self, name: str, process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
        self.name = name
        self.process = process
        self.url = url
        self.log_path = log_path

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Poll ``/-/ready`` until 200; RuntimeError with the log tail if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready within {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _start(name: str, make_args, workdir: Path, attempts: int = 3) -> Server:
    """Start ``make_args(port)`` on a free port, retrying if the port was taken meanwhile."""
    workdir.mkdir(parents=True, exist_ok=True)
    error: Exception | None = None
    for attempt in range(attempts):
        port = free_port()
        log_path = workdir / f"{name}-{attempt}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(make_args(port), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir)
        server = Server(name, process, f"http://127.0.0.1:{port}", log_path)
        try:
            server.wait_ready()
            return server
        except RuntimeError as exc:
            server.stop()
            error = exc
    raise RuntimeError(f"could not start {name} after {attempts} attempts") from error


def start_alertmanager(config_text: str, tmp_path: Path) -> Server:
    """Alertmanager (Debian's ``prometheus-alertmanager``) with ``config_text``, clustering off."""
    binary = require_binary(ALERTMANAGER_BIN)
    workdir = tmp_path / "alertmanager"
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "alertmanager.yml"
    config.write_text(config_text)
    return _start(
        "alertmanager",
        lambda port: [
            binary,
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",  # without it Alertmanager opens 0.0.0.0:9094 for gossip
            f"--storage.path={workdir / 'data'}",
            f"--web.external-url=http://127.0.0.1:{port}/",
        ],
        workdir,
    )


def start_prometheus(config_text: str, tmp_path: Path, extra_args: list[str] | None = None) -> Server:
    """Prometheus with ``config_text`` (a prometheus.yml; rule files may sit beside it under tmp_path)."""
    binary = require_binary(PROMETHEUS_BIN)
    workdir = tmp_path / "prometheus"
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(config_text)
    return _start(
        "prometheus",
        lambda port: [
            binary,
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.external-url=http://127.0.0.1:{port}/",
            *(extra_args or []),
        ],
        workdir,
    )
