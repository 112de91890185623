"""The agent's line to the watchdog: register, poll for commands, send acknowledgements.

A daemon thread does all network I/O; the training thread only drains an in-memory
inbox between steps and never waits on the network. A dead or slow watchdog costs
nothing but log lines (rate-limited); the thread re-registers when it comes back,
or when a poll answers 404 (the watchdog forgot the run). Every exchange has one
deadline from connect to last byte, and close() never waits for the network.
Commands are checked here before the trainer sees them: signature (HMAC with the
shared secret), run name, expiry, and duplicates (an id applies at most once).
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from urllib.parse import urlencode, urlsplit

from pydantic import ValidationError

from gradwatch.agent.throttle import Throttled
from gradwatch.watchdog.schema import AUTH_HEADER, Ack, Registration, SignedCommand, sign_request

log = logging.getLogger("gradwatch.agent")

SEEN_IDS = 4096
MIN_POLL_S, MAX_POLL_S = 0.1, 60.0
"""The range a poll interval sent by the watchdog is clamped to."""
DEFAULT_POLL_S = 1.0
"""The poll interval until the watchdog names one (without an explicit poll_interval_s)."""
CLOSE_WAIT_S = 0.5
"""The longest close() waits for the control thread."""
GOODBYE_S = 2.0
"""The last acknowledgements and the deregistration, together, after close()."""
MAX_ANSWER_BYTES = 8 * 1024 * 1024


class HTTPStatusError(RuntimeError):
    """The watchdog answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ControlClient:
    def __init__(
        self,
        url: str,
        secret: bytes | None,
        registration: Registration,
        *,
        poll: bool,
        poll_interval_s: float | None = None,
        timeout_s: float = 5.0,
        clock=time.time,
    ) -> None:
        self.base = url.rstrip("/")
        self.secret = secret
        self.registration = registration
        self.poll_enabled = poll
        self.poll_interval_s = poll_interval_s  # explicit (watch() argument): wins over the watchdog's
        self.watchdog_interval_s = DEFAULT_POLL_S
        self.timeout_s = timeout_s
        self.clock = clock
        self.inbox: deque[SignedCommand] = deque()
        self._acks: deque[Ack] = deque()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._after_seq = 0
        self._registered = False
        self._last_error: tuple[str, float] | None = None
        self._stop = threading.Event()
        self._inflight: Callable[[], None] | None = None  # cuts the request in flight short
        self._warn_unreadable = Throttled(log)
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

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Stop polling and return within ``wait_s``, whatever the watchdog does.

        The control thread then makes one last attempt, bounded by GOODBYE_S, to send the
        pending acknowledgements and tell the watchdog the run finished (so its silence is
        not taken for a stall). A request in flight is cut short first. Best effort: a
        process that exits at once may end the attempt (the thread is a daemon).
        """
        self._stop.set()
        self._cut_inflight()
        self._thread.join(timeout=wait_s)

    # -- network thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._registered:
                    self._register()
                if self.poll_enabled:
                    self._poll()
                self._flush_acks()
            except HTTPStatusError as exc:
                if exc.status == 404:  # the watchdog forgot this run (restart, expiry, a deregistration)
                    self._registered = False
                self._warn(exc)
            except (OSError, http.client.HTTPException) as exc:  # unreachable: maybe a fresh watchdog
                self._registered = False
                self._warn(exc)
            except Exception as exc:  # e.g. an answer that is not JSON: nothing to re-register for
                self._warn(exc)
            self._stop.wait(self._interval())
        self._goodbye()

    def _goodbye(self) -> None:
        reg = self.registration
        deadline = time.monotonic() + GOODBYE_S
        try:
            self._flush_acks(deadline=deadline)
            query = urlencode({"rank": reg.rank, "instance": reg.instance} if reg.instance else {"rank": reg.rank})
            self._request("DELETE", f"/api/v1/runs/{reg.run}?{query}", deadline=deadline)
        except Exception as exc:  # the watchdog may be gone: nothing to do about it now
            log.debug("gradwatch: could not say goodbye to the watchdog: %s", exc)

    def _interval(self) -> float:
        """The explicit poll_interval_s if one was given, else the watchdog's (clamped)."""
        if self.poll_interval_s is not None:
            return self.poll_interval_s
        return self.watchdog_interval_s

    def _warn(self, exc: Exception) -> None:
        message, now = str(exc), self.clock()
        if self._last_error is None or self._last_error[0] != message or now - self._last_error[1] > 60:
            log.warning("gradwatch: watchdog at %s unreachable or refusing: %s (training continues)", self.base, message)
            self._last_error = (message, now)

    def _cut_inflight(self) -> None:
        cut = self._inflight
        if cut is not None:
            cut()

    def _request(self, method: str, path: str, body: bytes = b"", deadline: float | None = None) -> bytes:
        """One HTTP exchange, bounded as a whole (connect to last byte) by ``timeout_s`` or ``deadline``
        (time.monotonic()): a watchdog that trickles its answer is cut off like a silent one."""
        budget = self.timeout_s if deadline is None else min(self.timeout_s, deadline - time.monotonic())
        if budget <= 0:
            raise TimeoutError(f"{method} {path}: no time left")
        url = urlsplit(self.base)
        connection_class = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        conn = connection_class(url.hostname, url.port, timeout=budget)
        target = url.path + path
        headers = {"Content-Type": "application/json"}
        if self.secret is not None:  # the signature covers the path as the server sees it, query included
            headers[AUTH_HEADER] = sign_request(self.secret, method, target, body, self.clock())
        cut = threading.Event()

        def cut_off() -> None:  # from the timer or close(): unblocks a recv() that is waiting
            cut.set()
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(budget, cut_off)
        timer.daemon = True
        self._inflight = cut_off
        timer.start()
        try:
            conn.request(method, target, body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read(MAX_ANSWER_BYTES + 1)
            status = response.status
        except (OSError, http.client.HTTPException):
            if cut.is_set():
                raise TimeoutError(f"{method} {path}: no complete answer within {budget:.1f} s") from None
            raise
        finally:
            self._inflight = None
            timer.cancel()
            conn.close()
        if len(data) > MAX_ANSWER_BYTES:
            raise ValueError(f"{method} {path}: answer larger than {MAX_ANSWER_BYTES} bytes")
        if status >= 400:
            raise HTTPStatusError(status, f"{method} {path}: HTTP {status} {data[:300].decode(errors='replace')}")
        return data

    def _register(self) -> None:
        self._request("POST", "/api/v1/runs", self.registration.model_dump_json().encode())
        self._registered = True
        self._last_error = None
        log.info("gradwatch: registered run %r rank %d with %s", self.registration.run, self.registration.rank, self.base)

    def _poll(self) -> None:
        """Ask for commands after the last seq seen. Each entry is checked on its own: one this
        agent cannot read (a newer watchdog's action, a bad factor) is acknowledged as rejected
        with the reason, and the rest of the batch goes on."""
        run, rank = self.registration.run, self.registration.rank
        raw = self._request("GET", f"/api/v1/runs/{run}/commands?rank={rank}&after={self._after_seq}")
        answer = json.loads(raw)
        if not isinstance(answer, dict) or not isinstance(answer.get("commands", []), list):
            raise ValueError("the watchdog's answer to a poll is not a command batch")
        self._take_interval(answer.get("poll_interval_s"))
        for entry in answer.get("commands", []):
            try:
                signed = SignedCommand.model_validate(entry)
            except ValidationError as exc:
                self._reject_unreadable(entry, exc)
                continue
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

    def _take_interval(self, value: object) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            self.watchdog_interval_s = min(max(float(value), MIN_POLL_S), MAX_POLL_S)

    def _reject_unreadable(self, entry: object, exc: ValidationError) -> None:
        """Acknowledge, as rejected, a command that does not pass the wire schema, if its id can
        be read; step past its seq either way, so it cannot hold back the commands behind it."""
        command = entry.get("command") if isinstance(entry, dict) else None
        command = command if isinstance(command, dict) else {}
        seq, command_id = command.get("seq"), command.get("id")
        if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 1:
            self._after_seq = max(self._after_seq, seq)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        detail = f"this agent cannot read the command: {problems}"[:1024]
        self._warn_unreadable.warning("unreadable", "gradwatch: command %r rejected: %s", command_id, detail)
        if isinstance(command_id, str) and 0 < len(command_id) <= 64:
            run, rank = self.registration.run, self.registration.rank
            self.ack(Ack(command_id=command_id, run=run, rank=rank, status="rejected", detail=detail, at=self.clock()))

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

    def _flush_acks(self, deadline: float | None = None) -> None:
        if not self._acks:
            return
        batch = [self._acks.popleft() for _ in range(len(self._acks))]
        body = json.dumps([a.model_dump(mode="json") for a in batch]).encode()
        try:
            self._request("POST", f"/api/v1/runs/{self.registration.run}/acks", body, deadline=deadline)
        except Exception:
            self._acks.extendleft(reversed(batch))  # keep them for the next attempt
            raise
