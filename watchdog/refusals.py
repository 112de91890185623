"""Refused requests in the audit log, counted and sampled: a flood of them cannot fill the disk.

The first refusal of a kind for one client and one reason within ``window_s`` is
written at once (``count: 1``, with its details) and logged; the ones after it in
that window are only counted, and written as one row (``count: N``, the window's
first and last time) when the window is over: at the next refusal, or at
:meth:`RefusalAudit.flush` (the service's close). So a client refused 1,000 times in
a minute adds two rows, not 1,000. At most ``max_keys`` (client, reason) pairs are
tracked at once; past that, refusals are counted under the client ``*``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gradwatch.watchdog.store import Store

log = logging.getLogger("gradwatch.watchdog")

OTHER_CLIENTS = "*"


@dataclass
class _Window:
    started_at: float
    last_at: float
    suppressed: int = 0


class RefusalAudit:
    def __init__(self, store: Store, clock: Callable[[], float], window_s: float = 60.0, max_keys: int = 1000) -> None:
        self.store = store
        self.clock = clock
        self.window_s = window_s
        self.max_keys = max_keys
        self._windows: dict[tuple[str, str, str], _Window] = {}
        self._lock = threading.Lock()

    def refused(self, kind: str, client: str, reason: str, details: Mapping[str, Any] | None = None,
                run: str | None = None) -> None:
        """Count one refused request (``kind`` like ``auth.refused``); write a row if it is the window's first."""
        now = self.clock()
        shape = re.sub(r"\d+(\.\d+)?", "N", reason)[:200]  # "timestamp is 301 s away" and "... 302 s" are one reason
        with self._lock:
            rows = self._expired_locked(now)
            key = (kind, client, shape)
            if key not in self._windows and len(self._windows) >= self.max_keys:
                key = (kind, OTHER_CLIENTS, shape)
            window = self._windows.get(key)
            if window is None:
                self._windows[key] = _Window(now, now)
                rows.append(dict(kind=kind, time=now, run=run,
                                 details={**(details or {}), "client": client, "reason": reason, "count": 1}))
                log.warning("refused %s from %s: %s (more like it within %g s are counted, not logged)",
                            kind, client, reason, self.window_s)
            else:
                window.suppressed += 1
                window.last_at = now
        self._write(rows)

    def flush(self) -> None:
        """Write the counts of every open window (at shutdown)."""
        with self._lock:
            rows = self._expired_locked(None)
        self._write(rows)

    def _expired_locked(self, now: float | None) -> list[dict]:
        rows = []
        for key, window in list(self._windows.items()):
            if now is not None and now - window.started_at < self.window_s:
                continue
            del self._windows[key]
            if window.suppressed:
                kind, client, shape = key
                rows.append(dict(kind=kind, time=window.last_at, details={
                    "client": client, "reason": shape, "count": window.suppressed,
                    "first_at": window.started_at, "last_at": window.last_at,
                }))
        return rows

    def _write(self, rows: list[dict]) -> None:
        if not rows:
            return
        with contextlib.suppress(sqlite3.Error):  # the store reports its own failure (health, one log line)
            self.store.append_audit_many(rows)
