"""A local HTTP receiver for tests: records every request, fails or hangs on demand.

Stands in for Alertmanager, a webhook endpoint or Slack. Binds 127.0.0.1 on an
ephemeral port; use it as a context manager (or the ``receiver`` fixture) so it
always stops.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """Threaded HTTP server recording requests. ``fail_next(n)`` answers the next n with an error;
    ``hang = True`` holds every request open until the receiver stops (a black-hole endpoint)."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.hang = False
        self.hung = 0  # requests held open so far
        self._fail_left = 0
        self._fail_status = 500
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="test-receiver", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail_next(self, count: int, status: int = 500) -> None:
        with self._cond:
            self._fail_left, self._fail_status = count, status

    def successful(self) -> list[Request]:
        with self._cond:
            return [r for r in self.requests if r.status < 300]

    def wait_for(self, count: int, timeout: float = 5.0, *, successful: bool = True) -> list[Request]:
        """Block until at least ``count`` (successful) requests arrived; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [r for r in self.requests if r.status < 300 or not successful]
                if len(got) >= count:
                    return got
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"receiver got {len(got)} requests, expected {count} within {timeout}s")
                self._cond.wait(remaining)

    def wait_for_hung(self, count: int = 1, timeout: float = 5.0) -> None:
        """Block until ``count`` requests are being held open (``hang`` mode)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.hung < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{self.hung} requests held open, expected {count} within {timeout}s")
                self._cond.wait(remaining)

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases hanging handlers
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if receiver.hang:
                    with receiver._cond:
                        receiver.hung += 1
                        receiver._cond.notify_all()
                    receiver._stopping.wait()
                    return
                with receiver._cond:
                    status = 200
                    if receiver._fail_left > 0:
                        receiver._fail_left -= 1
                        status = receiver._fail_status
                    receiver.requests.append(Request("POST", self.path, dict(self.headers.items()), body, status))
                    receiver._cond.notify_all()
                reply = b"ok" if status < 300 else b"failing on purpose"
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

        return Handler
