"""The demo's story as it happens: one line per event, under a progress bar.

Events come from three places, each the one a user would look at in production:
the agent's log (the guard holding a spike, skipping a NaN step, applying a command),
the watchdog's audit log read over its HTTP API (alerts, notifications, commands,
acknowledgements), and the notification sink (what the on-call person receives).
The training thread calls :meth:`Timeline.tick` once per step; the watchdog is read
on a background thread so a slow request never holds a step.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
import math
import queue
import re
import sys
import threading
import time
from dataclasses import dataclass

import httpx

from gradwatch.demo.services import WatchdogProcess


# Events wait this long before printing, so that the watchdog's (read over HTTP every 0.2 s)
# and the agent's (immediate) come out in the order they happened.
HOLD_S = 0.6
BAR_EVERY_S = 0.1  # the progress bar is redrawn at most this often


@dataclass
class Event:
    at: float  # seconds since the demo's training began
    step: int
    source: str  # agent | watchdog | notify | demo
    kind: str  # e.g. alert.firing, command.acked, guard
    text: str


# "(GradientSpikesHeld firing for {'alertname': ...})" -> "(GradientSpikesHeld firing)"
_SHORT_REASON = re.compile(r"\((\w+ firing) for \{[^}]*\}\)")
# The agent's guard names where a spike or a NaN step started.
_ORIGIN = re.compile(r"^step (\d+)\b.*(?:most of it in|first in) layer '([^']+)'")


class _AgentLog(logging.Handler):
    """The agent's log lines become events (instead of going to stderr)."""

    def __init__(self, timeline: Timeline) -> None:
        super().__init__(logging.INFO)
        self.timeline = timeline

    def emit(self, record: logging.LogRecord) -> None:
        text = _SHORT_REASON.sub(r"(\1)", record.getMessage().removeprefix("gradwatch: "))
        if "metrics at" in text or "watching run" in text:
            return
        if " applied " in text or " refused " in text:
            kind = "command"
        elif "clipped" in text or "skipped" in text:
            kind = "guard"
        else:
            kind = "agent"
        origin = _ORIGIN.match(text)
        if origin and self.timeline.origin is None:
            self.timeline.origin = (origin.group(2), int(origin.group(1)))
        self.timeline.add("agent", kind, text)


def _describe(entry: dict) -> str | None:
    """One line for an audit entry a reader cares about; None for bookkeeping."""
    kind, rule, details = entry["kind"], entry.get("rule"), entry.get("details") or {}
    labels = {k: v for k, v in (details.get("labels") or {}).items() if k not in ("alertname", "run", "rank")}
    where = ", ".join(f"{k}={v}" for k, v in labels.items())
    if kind == "alert.pending":
        return f"alert {rule} pending ({where}); fires if it holds for the rule's `for`"
    if kind == "alert.firing":
        return f"ALERT {rule} FIRING ({where}), value {details.get('value')}"
    if kind == "alert.resolved":
        return f"alert {rule} resolved"
    if kind in ("notify.sent", "notify.failed"):
        outcome = "notified" if kind == "notify.sent" else "notification FAILED to"
        return f"{outcome} {details.get('notifier')} ({details.get('state')}, {rule})"
    if kind == "command.decided" and rule == "gradwatch:restore":
        spec = details.get("spec") or {}
        return f"remediation undone: {spec.get('action')} ({details.get('evidence')})"
    if kind == "command.decided":
        spec = details.get("spec") or {}
        args = ", ".join(f"{k} {v}" for k, v in spec.items() if k != "action" and v is not None)
        return f"remediation decided: {spec.get('action')} ({args}) — policy of {rule}"
    if kind == "command.suppressed":
        return f"remediation held back: {details.get('reason') or details}"
    if kind == "command.held_back":
        return f"remediation held back ({(details.get('spec') or {}).get('action')}): {details.get('evidence')}"
    if kind == "command.observed":
        return f"observe mode: would apply {(details.get('spec') or {}).get('action')} at step {details.get('step')}"
    if kind == "remediation.restore_abandoned":
        return f"undo stopped for this incident: {', '.join(details.get('alerts') or [])} fired again while restoring"
    if kind == "command.acked":
        return (f"trainer acknowledged: {details.get('status')} at step {details.get('step')} "
                f"({details.get('detail')})")
    if kind == "run.registered":
        return f"run registered; scraping {details.get('metrics_url')}"
    return None


class Timeline:
    """Collects events from every source and prints them in order, with a progress bar on a terminal."""

    def __init__(self, watchdog: WatchdogProcess, run: str, total_steps: int, out=sys.stdout) -> None:
        self.watchdog = watchdog
        self.run = run
        self.total = total_steps
        self.out = out
        self.events: list[Event] = []
        self.tty = out.isatty()
        self.step = 0
        self._status = ""
        self._start = time.time()
        self._pending: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._tick_at: list[float] = []  # when each step ended, seconds since the start
        self._held: list[tuple[float, int, Event]] = []  # a heap by time stamp
        self._order = itertools.count()  # ties keep arrival order
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_watchdog, name="demo-timeline", daemon=True)
        self._handler = _AgentLog(self)
        self._next_report = 0.25
        self._next_draw = 0.0
        self.origin: tuple[str, int] | None = None  # (layer, step) where the agent first saw trouble

    # -- sources -------------------------------------------------------------------------

    def add(self, source: str, kind: str, text: str, step: int | None = None, at: float | None = None) -> None:
        """Queue an event; ``at`` is its wall-clock time (epoch seconds) when the source stamped it, else now."""
        since = (at if at is not None else time.time()) - self._start
        if step is None:  # the steps completed by then (the poller's events arrive a little late)
            step = bisect.bisect_right(self._tick_at, since) if at is not None else self.step
        self._pending.put(Event(since, step, source, kind, text))

    def _poll_watchdog(self) -> None:
        last_id = 0
        while not self._stop.wait(0.2):
            last_id = self._read_audit(last_id)

    def _read_audit(self, after_id: int) -> int:
        """Queue the audit entries newer than ``after_id``; returns the newest id seen."""
        try:
            entries = self.watchdog.get("/api/v1/audit", run=self.run, limit=500)
        except httpx.HTTPError:
            return after_id  # the next poll tries again
        for entry in sorted(entries, key=lambda e: e["id"]):
            if entry["id"] <= after_id:
                continue
            after_id = entry["id"]
            text = _describe(entry)
            if text is not None:
                if entry["kind"] == "alert.firing" and self.origin is not None and "layer" not in text:
                    text += f"; it started in layer {self.origin[0]} (the agent's guard, step {self.origin[1]})"
                step = (entry.get("details") or {}).get("step") if entry["kind"] == "command.acked" else None
                self.add("watchdog", entry["kind"], text, step, at=entry["time"])
        return after_id

    # -- the training thread ---------------------------------------------------------------

    def __enter__(self) -> Timeline:
        logger = logging.getLogger("gradwatch.agent")
        logger.addHandler(self._handler)
        self._level, self._propagate = logger.level, logger.propagate
        logger.setLevel(logging.INFO)
        logger.propagate = False
        self._poller.start()
        return self

    def tick(self, step: int, status: str) -> None:
        """After each training step: print what happened since the last tick, redraw the bar."""
        self.step = step
        self._tick_at.append(time.time() - self._start)
        self._status = status
        self._flush()
        if self.tty:
            if self._tick_at[-1] >= self._next_draw or step == self.total:  # a terminal write per step costs
                self._next_draw = self._tick_at[-1] + BAR_EVERY_S
                self._draw_bar()
        elif step / self.total >= self._next_report:  # a log file gets a progress line every quarter
            self._next_report += 0.25
            self._print(f"{'':>7} {step:>5}  {'progress':<9} {100 * step / self.total:3.0f}%  {status}")

    def _flush(self, hold_s: float = HOLD_S) -> None:
        """Print the events older than ``hold_s``, in the order their sources stamped them."""
        while True:
            try:
                event = self._pending.get_nowait()
                heapq.heappush(self._held, (event.at, next(self._order), event))
            except queue.Empty:
                break
        now = time.time() - self._start
        while self._held and self._held[0][0] <= now - hold_s:
            event = heapq.heappop(self._held)[2]
            self.events.append(event)
            self._print(f"{max(event.at, 0.0):6.1f}s {event.step:>5}  {event.source:<9} {event.text}")

    def _print(self, line: str) -> None:
        if self.tty:
            self.out.write("\r\033[K")
        self.out.write(line + "\n")
        self.out.flush()

    def _draw_bar(self, width: int = 30) -> None:
        done = int(width * self.step / self.total)
        self.out.write(f"\r\033[K[{'#' * done}{'.' * (width - done)}] step {self.step}/{self.total}  {self._status}")
        self.out.flush()

    def settle(self, seconds: float) -> None:
        """After training: let the watchdog's last round, notification and acknowledgement arrive."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.1)
            self._flush()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._poller.join(timeout=5)
        self._flush(hold_s=-math.inf)
        if self.tty:
            self.out.write("\r\033[K")
            self.out.flush()
        logger = logging.getLogger("gradwatch.agent")
        logger.removeHandler(self._handler)
        logger.setLevel(self._level)
        logger.propagate = self._propagate
