"""The agent's /metrics endpoint: one thread, bounded in connections, time and share of the GIL.

A scrape must never slow the training thread it shares a process with. So:
- one thread serves every connection from a selector (no thread per client: 500
  idle connections are 500 sockets, not 500 threads), at most ``max_connections``
  open at once; at the cap a newcomer takes the place of the oldest connection
  that has not finished sending its request (a slow or idle client), or is answered 503;
- each connection has ``timeout_s`` for the whole exchange, request and response
  (a client trickling its request byte by byte is dropped as surely as an idle one);
- the thread's own CPU time is kept to ``busy_fraction`` of wall time: after each
  burst of work it rests (GIL released) in proportion, so however many scrapers
  come, the training thread holds the GIL the rest of the time;
- the collector serves cached text (rendered once per telemetry change); a large
  re-rendering advances one small piece per round, between requests, so it is
  paced by the same rest;
- requests are served one at a time, the registered consumers' (watchdog, Prometheus) first.

It names each scraper (client address + User-Agent) to the collector, so per-scraper
peaks stay exact. A preferred port already taken is not an error: the next free one
of ``PORT_TRIES`` is used, then an ephemeral one, and :attr:`url` tells which.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from gradwatch.agent.exporter import GradwatchCollector
from gradwatch.agent.telemetry import scraper_slot
from gradwatch.agent.throttle import Throttled

log = logging.getLogger("gradwatch.agent")

PORT_TRIES = 16
"""Ports tried from the preferred one upwards before an ephemeral one."""
MAX_CONNECTIONS = 32
TIMEOUT_S = 3.0
BUSY_FRACTION = 0.02
MAX_HEAD_BYTES = 8192
SLOW_CLIENT_S = 0.25
"""A connection that has not sent its whole request after this long may give its place to a newcomer."""
_ACCEPTS_PER_ROUND = 16
_PATHS = ("/metrics", "/")


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    address: str
    opened: float
    inbuf: bytearray = field(default_factory=bytearray)
    request: tuple[str, str] | None = None  # (User-Agent, Accept) once the head is read
    consumer: bool = False
    out: memoryview | None = None
    events: int = 0


def _status(code: int, reason: str, body: bytes = b"", content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


_BUSY = _status(503, "Service Unavailable", b"too many connections\n")


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``port``, or the next free one, or an ephemeral one."""
    candidates = [p for p in range(port, port + PORT_TRIES) if p <= 65535] + [0] if port else [0]
    for candidate in candidates:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, candidate, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT, not a live listener
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                continue
            raise
        sock.listen(128)
        if candidate != port:
            log.warning(
                "gradwatch: metrics port %d on %s is in use; serving on port %d instead", port, host, sock.getsockname()[1]
            )
        return sock
    raise AssertionError("unreachable: an ephemeral port is the last candidate")


class MetricsServer:
    def __init__(
        self,
        collector: GradwatchCollector,
        host: str,
        port: int,
        *,
        max_connections: int = MAX_CONNECTIONS,
        timeout_s: float = TIMEOUT_S,
        busy_fraction: float = BUSY_FRACTION,
    ) -> None:
        self.collector = collector
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.busy_fraction = busy_fraction
        self._listener = _bind(host, port)
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._conns: dict[socket.socket, _Conn] = {}  # in the order they opened
        self._queue: list[_Conn] = []  # complete requests waiting for their response
        self._rendering = False  # the collector has a rendering in progress
        self._stopping = threading.Event()
        self._warn = Throttled(log)
        self._thread = threading.Thread(target=self._serve, name="gradwatch-metrics", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"

    def close(self) -> None:
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(timeout=5)
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._selector.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    # -- the server's thread ---------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                events = self._selector.select(self._wait_s())
            except OSError:  # closed under us
                return
            started = time.thread_time()
            for key, mask in events:
                if key.data == "wake":
                    return
                self._guarded(self._handle, key.data, mask)
            self._guarded(self._respond)
            self._rendering = bool(self._guarded(self.collector.render_step))
            self._expire()
            # Rest in proportion to the work just done (CPU time: not time spent waiting for the GIL).
            spent = time.thread_time() - started
            if spent > 0:
                self._stopping.wait(min(spent * (1 - self.busy_fraction) / self.busy_fraction, 1.0))

    def _handle(self, what: _Conn | str, mask: int) -> None:
        if what == "accept":
            self._accept()
        elif mask & selectors.EVENT_WRITE:
            self._write(what)
        else:
            self._read(what)

    def _guarded(self, fn, *args):
        """Run one piece of the server's work; a failure is logged (throttled), never ends the endpoint."""
        try:
            return fn(*args)
        except Exception as exc:
            self._warn.warning("serve", "gradwatch: metrics endpoint: %s failed: %r", fn.__name__, exc)
            if args and isinstance(args[0], _Conn):
                self._drop(args[0])
            return None

    def _wait_s(self) -> float | None:
        if self._queue or self._rendering:
            return 0
        if not self._conns:
            return None
        oldest = next(iter(self._conns.values())).opened
        return max(0.0, oldest + self.timeout_s - time.monotonic())

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_ROUND):
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: the next round tries again
                log.debug("gradwatch: metrics accept failed: %s", exc)
                return
            sock.setblocking(False)
            if len(self._conns) >= self.max_connections and not self._evict_slow():
                try:
                    sock.send(_BUSY)
                except OSError:
                    pass
                sock.close()
                continue
            conn = _Conn(sock, address[0], time.monotonic())
            self._conns[sock] = conn
            self._watch(conn, selectors.EVENT_READ)

    def _evict_slow(self) -> bool:
        """Close the oldest connection still sending its request, if it had its chance; True if one was."""
        now = time.monotonic()
        for conn in self._conns.values():
            if conn.request is None and conn.out is None and now - conn.opened > SLOW_CLIENT_S:
                self._drop(conn)
                return True
        return False

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        conn.inbuf += data
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.inbuf) > MAX_HEAD_BYTES:
                self._send(conn, _status(431, "Request Header Fields Too Large"))
            return
        self._watch(conn, 0)
        lines = bytes(conn.inbuf[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3:
            self._send(conn, _status(400, "Bad Request"))
        elif parts[0] != "GET":
            self._send(conn, _status(405, "Method Not Allowed"))
        elif parts[1].split("?")[0] not in _PATHS:
            self._send(conn, _status(404, "Not Found"))
        else:
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            conn.request = (headers.get("user-agent", ""), headers.get("accept", ""))
            conn.consumer = scraper_slot(conn.address, conn.request[0])[1]
            self._queue.append(conn)

    def _respond(self) -> None:
        """Answer one queued request: a registered consumer's first, else the oldest."""
        if not self._queue:
            return
        conn = min(self._queue, key=lambda c: (not c.consumer, c.opened))
        self._queue.remove(conn)
        user_agent, accept = conn.request
        body, content_type = self.collector.exposition(conn.address, user_agent, accept)
        self._send(conn, _status(200, "OK", body, content_type))

    def _send(self, conn: _Conn, data: bytes) -> None:
        conn.out = memoryview(data)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            self._watch(conn, selectors.EVENT_WRITE)
        else:
            self._drop(conn)

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in list(self._conns.values()):
            if now - conn.opened <= self.timeout_s:
                break  # in the order they opened: the rest are younger
            self._drop(conn)

    def _watch(self, conn: _Conn, events: int) -> None:
        if events == conn.events:
            return
        if conn.events == 0:
            self._selector.register(conn.sock, events, conn)
        elif events == 0:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    def _drop(self, conn: _Conn) -> None:
        try:
            self._watch(conn, 0)
        except (KeyError, ValueError, OSError):  # not registered, or its socket already closed
            conn.events = 0
        if conn in self._queue:
            self._queue.remove(conn)
        self._conns.pop(conn.sock, None)
        conn.sock.close()
