"""Hostile scrape targets on 127.0.0.1 for the watchdog's tests and fault benchmarks.

Each is a raw TCP server (no HTTP library: it must be able to misbehave) started on a
free port and stopped by :meth:`HostileTarget.stop`:

- :func:`trickling`: answers its status line and headers (then the body) ``step`` bytes
  every ``every_s`` seconds, as a slowloris server would;
- :func:`black_hole`: listens but never accepts: connections complete in the kernel's
  backlog and nothing is ever sent;
- :func:`serving`: answers every request with a fixed status and body (``body`` may be
  a callable returning a new body per request, e.g. labels that change every scrape).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable


class HostileTarget:
    """A listening socket and the thread serving it; ``url`` is its /metrics URL."""

    def __init__(self, handle: Callable[[socket.socket], None] | None, backlog: int = 128) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/metrics"
        self.requests = 0
        self.last_request = b""
        self.hung_up = 0
        """Connections the client closed before the whole answer was sent."""
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._handle = handle
        if handle is not None:
            self._start(self._accept_loop)

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        self.sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._start(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        self._conns.add(conn)
        with conn:
            conn.settimeout(5)
            try:
                while not self._stop.is_set():
                    request = _read_request(conn)
                    if request is None:
                        return
                    self.requests += 1
                    self.last_request = request
                    self._handle(conn)
            except OSError:
                if not self._stop.is_set():
                    self.hung_up += 1
            finally:
                self._conns.discard(conn)

    def stopped(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        for conn in list(self._conns):  # wakes the threads waiting on a kept-alive connection
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> HostileTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_request(conn: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return None
        data += chunk
    return data


def response(body: bytes, status: str = "200 OK") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def trickling(body: bytes = b"gradwatch_step 1\n", *, step: int = 1, every_s: float = 1.0) -> HostileTarget:
    """Sends its whole answer, status line and headers included, ``step`` bytes per ``every_s`` seconds."""
    target: HostileTarget

    def handle(conn: socket.socket) -> None:
        data = response(body)
        for i in range(0, len(data), step):
            if target.stopped():
                return
            conn.sendall(data[i : i + step])
            time.sleep(every_s)

    target = HostileTarget(handle)
    return target


def black_hole(backlog: int = 128) -> HostileTarget:
    """Accepts nothing: connects succeed into the kernel's backlog, then silence."""
    return HostileTarget(None, backlog=backlog)


def serving(body: bytes | Callable[[], bytes], status: str = "200 OK") -> HostileTarget:
    """Answers every request with ``status`` and ``body`` (called per request if callable)."""

    def handle(conn: socket.socket) -> None:
        conn.sendall(response(body() if callable(body) else body, status))

    return HostileTarget(handle)
