"""``gradwatch serve`` itself: the open-mode warning at start-up, and a full disk (a real one: a small
tmpfs in a private mount namespace) is reported unhealthy, before and after a restart."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.servers import free_port
from tests.integration.watchdog_process import start_watchdog

pytestmark = pytest.mark.integration


def test_open_mode_is_announced_loudly_at_start_up(tmp_path, monkeypatch):
    monkeypatch.delenv("GRADWATCH_SECRET", raising=False)
    server = start_watchdog(tmp_path / "open")
    try:
        assert "OPEN MODE: no secret is set" in server.log_tail()
    finally:
        server.stop()
    monkeypatch.setenv("GRADWATCH_SECRET", "s3cret")
    server = start_watchdog(tmp_path / "closed")
    try:
        assert "OPEN MODE" not in server.log_tail()
    finally:
        server.stop()


def _namespaces_work() -> bool:
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("nsenter")):
        return False
    done = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return done.returncode == 0


@contextlib.contextmanager
def small_disk(mountpoint: Path, size: str = "8m"):
    """A tmpfs of ``size`` at ``mountpoint``, visible only in a private mount namespace; yields its holder."""
    mountpoint.mkdir()
    holder = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs -o size={size} tmpfs {mountpoint} && echo ready && exec sleep 600"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def fill(holder: subprocess.Popen, mountpoint: Path, name: str) -> None:
    """Write to the tmpfs (through the holder's view of the file system) until it is full."""
    with open(f"/proc/{holder.pid}/root{mountpoint}/{name}", "ab") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()


def serve_in(holder: subprocess.Popen, db: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = ["nsenter", "-t", str(holder.pid), "-m", "--", sys.executable, "-m", "gradwatch.watchdog.cli", "serve",
               "--port", str(port), "--db", str(db), "--scrape-interval", "0.5"]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return process, f"http://127.0.0.1:{port}"


def health(url: str) -> tuple[int, dict] | None:
    try:
        response = httpx.get(f"{url}/healthz", timeout=2)
    except httpx.HTTPError:
        return None
    return response.status_code, response.json()


def wait_for(check, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    return None


@pytest.mark.skipif(not _namespaces_work(), reason="needs root and mount namespaces for a real small disk")
def test_a_full_disk_is_unhealthy_and_a_restart_on_it_is_not_healthy(tmp_path):
    mountpoint = tmp_path / "disk"
    log = tmp_path / "watchdog.log"
    with small_disk(mountpoint) as holder:
        db = mountpoint / "gradwatch.db"
        process, url = serve_in(holder, db, log)
        try:
            assert wait_for(lambda: (health(url) or (0,))[0] == 200), log.read_text()[-3000:]
            fill(holder, mountpoint, "filler")
            # Registrations write the store; on a full disk they cannot: 503, never a 500.
            codes = set()
            for i in range(40):
                reg = {"run": f"r{i}", "rank": 0, "metrics_url": "http://127.0.0.1:9/metrics", "hostname": "h" * 250}
                codes.add(httpx.post(f"{url}/api/v1/runs", json=reg, timeout=5).status_code)
            assert 503 in codes and 500 not in codes
            status, body = health(url)
            assert status == 503 and body["status"] == "unhealthy" and not body["store"]["writable"]
            time.sleep(1.5)  # three rounds on the full disk
            text = log.read_text()
            assert text.count("cannot be written") == 1 and "Traceback" not in text  # once, not per write or round
            process.send_signal(signal.SIGKILL)  # a crash on the full disk; its WAL stays
            process.wait(10)
            fill(holder, mountpoint, "filler")
            process, url = serve_in(holder, db, log)
            # Restarted on the full disk: it refuses to start, or runs and says it is unhealthy; never healthy.
            seen = wait_for(lambda: process.poll() is not None or health(url), 20)
            assert seen, log.read_text()[-3000:]
            if process.poll() is None:
                for _ in range(10):
                    status, body = health(url)
                    assert status == 503 and body["status"] == "unhealthy", body
                    time.sleep(0.2)
            else:
                assert process.returncode != 0 and "cannot use the store" in log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
