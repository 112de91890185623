"""A minimal stand-in for the watchdog's agent-facing endpoints, for agent unit tests.

It speaks the wire schema (gradwatch.watchdog.schema) and checks the request
signature exactly as the watchdog must; the real service is exercised end to end
in tests/integration.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from gradwatch.watchdog.schema import (
    AUTH_HEADER,
    Ack,
    Command,
    Registration,
    SignedCommand,
    verify_request,
)


class FakeWatchdog:
    def __init__(self, secret: bytes | None) -> None:
        self.secret = secret
        self.registrations: list[Registration] = []
        self.finished: list[str] = []
        self.acks: list[Ack] = []
        self.auth_failures: list[str] = []
        self.queue: list[SignedCommand | dict] = []  # a dict: a raw entry, e.g. one the agent cannot read
        self.poll_interval_s = 0.05  # what the poll answers tell the agent
        self.polls = 0
        self.known = True  # False: polls answer 404 "run not registered" until the agent registers again
        self._seq = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _authorized(self, body: bytes) -> bool:
                if owner.secret is None:
                    return True
                reason = verify_request(owner.secret, self.headers.get(AUTH_HEADER), self.command, self.path, body, time.time())
                if reason:
                    owner.auth_failures.append(reason)
                    self.send_error(401, reason)
                return reason is None

            def _reply(self, payload: str) -> None:
                data = payload.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if not self._authorized(body):
                    return
                if self.path == "/api/v1/runs":
                    owner.registrations.append(Registration.model_validate_json(body))
                    owner.known = True
                else:
                    owner.acks.extend(Ack.model_validate(a) for a in json.loads(body))
                self._reply("{}")

            def do_DELETE(self):  # noqa: N802
                if self._authorized(b""):
                    owner.finished.append(self.path)
                    self._reply("{}")

            def do_GET(self):  # noqa: N802
                if not self._authorized(b""):
                    return
                owner.polls += 1
                if not owner.known:
                    data = b'{"detail": "run not registered"}'
                    self.send_response(404)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                after = int(self.path.rsplit("after=", 1)[1])
                entries = [c if isinstance(c, dict) else c.model_dump(mode="json") for c in owner.queue]
                batch = {"commands": [e for e in entries if e["command"]["seq"] > after],
                         "poll_interval_s": owner.poll_interval_s}
                self._reply(json.dumps(batch))

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def send(self, run: str, spec: dict, *, secret: bytes | None = None, seq: int | None = None,
             command_id: str | None = None, ttl: float = 60.0) -> SignedCommand:
        """Queue a command signed with ``secret`` (default: the shared one)."""
        self._seq += 1
        now = time.time()
        command = Command(
            id=command_id or f"cmd{self._seq:08d}", run=run, seq=seq or self._seq, spec=spec,
            reason="test", issued_at=now, expires_at=now + ttl,
        )
        signed = SignedCommand.sign(command, secret or self.secret)
        self.queue.append(signed)
        return signed

    def send_raw(self, command: dict) -> dict:
        """Queue an entry as a newer or broken watchdog might send it: no schema check, a bogus signature."""
        self._seq += 1
        now = time.time()
        entry = {"command": {"id": f"raw{self._seq:08d}", "run": "test", "seq": self._seq, "reason": "test",
                             "issued_at": now, "expires_at": now + 60, **command}, "signature": "0" * 64}
        self.queue.append(entry)
        return entry

    def wait_for_acks(self, n: int, step_fn, timeout: float = 10.0) -> list[Ack]:
        """Call ``step_fn()`` (one training step) until ``n`` acks arrived."""
        deadline = time.monotonic() + timeout
        while len(self.acks) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(self.acks)} of {n} acks arrived: {self.acks}")
            step_fn()
            time.sleep(0.01)
        return self.acks

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
