"""The agent's line to the watchdog: register, poll for commands, send acknowledgements.

A daemon thread does all network I/O; the training thread only drains an in-memory
inbox between steps and never waits on the network. A dead or slow watchdog costs
nothing but log lines (rate-limited); the thread re-registers when it comes back.
Commands are checked here before the trainer sees them: signature (HMAC with the
shared secret), run name, expiry, and duplicates (an id applies at most once).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict, deque
from urllib.parse import urlsplit

from gradwatch.watchdog.schema import AUTH_HEADER, Ack, CommandBatch, Registration, SignedCommand, sign_request

log = logging.getLogger("gradwatch.agent")

SEEN_IDS = 4096


class ControlClient:
    def __init__(
        self,
        url: str,
        secret: bytes | None,
        registration: Registration,
        *,
        poll: bool,
        poll_interval_s: float = 1.0,
        timeout_s: float = 5.0,
        clock=time.time,
    ) -> None:
        self.base = url.rstrip("/")
        self.secret = secret
        self.registration = registration
        self.poll_enabled = poll
        self.poll_interval_s = poll_interval_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.inbox: deque[SignedCommand] = deque()
        self._acks: deque[Ack] = deque()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._after_seq = 0
        self._registered = False
        self._last_error: tuple[str, float] | None = None
        self._stop = threading.Event()
        if poll and secret is None:
            log.warning("gradwatch: no command secret (GRADWATCH_SECRET): watchdog commands will be refused")
        self._thread = threading.Thread(target=self._loop, name="gradwatch-control", daemon=True)
        self._thread.start()

    # -- training-thread side ------------------------------------------------------------

    def drain(self) -> list[SignedCommand]:
        """Commands verified since the last call (non-blocking)."""
        out = []
        while self.inbox:
            out.append(self.inbox.popleft())
        return out

    def ack(self, ack: Ack) -> None:
        self._acks.append(ack)

    def mark_seen(self, ids) -> None:
        """Ids applied before a resume: never apply them again."""
        for command_id in ids:
            self._remember(command_id)

    def seen_ids(self) -> list[str]:
        return list(self._seen)

    def close(self) -> None:
        """Stop polling; pending acknowledgements get one last attempt; tell the watchdog the run
        finished (so its silence is not taken for a stall)."""
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + 1)
        run, rank = self.registration.run, self.registration.rank
        try:
            self._flush_acks()
            self._request("DELETE", f"/api/v1/runs/{run}?rank={rank}")
        except Exception as exc:  # the watchdog may be gone: nothing to do about it now
            log.debug("gradwatch: could not say goodbye to the watchdog: %s", exc)

    # -- network thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                if not self._registered:
                    self._register()
                if self.poll_enabled:
                    self._poll()
                self._flush_acks()
            except Exception as exc:
                self._registered = False
                self._warn(exc)
            if self._stop.wait(self.poll_interval_s):
                return

    def _warn(self, exc: Exception) -> None:
        message, now = str(exc), self.clock()
        if self._last_error is None or self._last_error[0] != message or now - self._last_error[1] > 60:
            log.warning("gradwatch: watchdog at %s unreachable or refusing: %s (training continues)", self.base, message)
            self._last_error = (message, now)

    def _request(self, method: str, path: str, body: bytes = b"") -> bytes:
        request = urllib.request.Request(self.base + path, data=body or None, method=method)
        request.add_header("Content-Type", "application/json")
        if self.secret is not None:  # the signature covers the path as the server sees it, query included
            target = urlsplit(self.base).path + path
            request.add_header(AUTH_HEADER, sign_request(self.secret, method, target, body, self.clock()))
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            raise RuntimeError(f"{method} {path}: HTTP {exc.code} {detail}") from None

    def _register(self) -> None:
        self._request("POST", "/api/v1/runs", self.registration.model_dump_json().encode())
        self._registered = True
        self._last_error = None
        log.info("gradwatch: registered run %r rank %d with %s", self.registration.run, self.registration.rank, self.base)

    def _poll(self) -> None:
        run, rank = self.registration.run, self.registration.rank
        raw = self._request("GET", f"/api/v1/runs/{run}/commands?rank={rank}&after={self._after_seq}")
        batch = CommandBatch.model_validate_json(raw)
        self.poll_interval_s = batch.poll_interval_s
        for signed in batch.commands:
            self._after_seq = max(self._after_seq, signed.command.seq)
            refusal = self._check(signed)
            if refusal is None:
                self._remember(signed.command.id)
                self.inbox.append(signed)
            else:
                status, detail = refusal
                log.warning("gradwatch: command %s %s: %s", signed.command.id, status, detail)
                self.ack(
                    Ack(command_id=signed.command.id, run=run, rank=rank, status=status, detail=detail, at=self.clock())
                )

    def _check(self, signed: SignedCommand) -> tuple[str, str] | None:
        command = signed.command
        if self.secret is None:
            return "rejected", "the agent has no command secret (set GRADWATCH_SECRET)"
        if not signed.verify(self.secret):
            return "rejected", "bad signature"
        if command.run != self.registration.run:
            return "rejected", f"command is for run {command.run!r}"
        if command.id in self._seen:
            return "duplicate", "already received"
        if command.expires_at < self.clock():
            return "expired", f"expired {self.clock() - command.expires_at:.0f} s ago"
        return None

    def _remember(self, command_id: str) -> None:
        self._seen[command_id] = None
        while len(self._seen) > SEEN_IDS:
            self._seen.popitem(last=False)

    def _flush_acks(self) -> None:
        if not self._acks:
            return
        batch = [self._acks.popleft() for _ in range(len(self._acks))]
        body = json.dumps([a.model_dump(mode="json") for a in batch]).encode()
        try:
            self._request("POST", f"/api/v1/runs/{self.registration.run}/acks", body)
        except Exception:
            self._acks.extendleft(reversed(batch))  # keep them for the next attempt
            raise
