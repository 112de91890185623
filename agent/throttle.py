"""Warnings that repeat every step are logged once per interval, with a count of the rest."""

from __future__ import annotations

import logging
import time


class Throttled:
    def __init__(self, logger: logging.Logger, interval_s: float = 30.0, clock=time.monotonic) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, message: str, *args) -> None:
        """Log now if ``key`` was quiet for ``interval_s``, else count it for the next line."""
        self._log(logging.WARNING, key, message, args, exc_info=False)

    def exception(self, key: str, message: str, *args) -> None:
        """As :meth:`warning`, at ERROR with the current exception's traceback (once per interval)."""
        self._log(logging.ERROR, key, message, args, exc_info=True)

    def _log(self, level: int, key: str, message: str, args: tuple, exc_info: bool) -> None:
        now = self.clock()
        if now - self._last.get(key, -float("inf")) < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        suffix = f" (and {held} more like it in the last {now - self._last[key]:.0f} s)" if held else ""
        self._last[key] = now
        self.logger.log(level, message + suffix, *args, exc_info=exc_info)
