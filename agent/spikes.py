"""The guard's answer to a finite gradient spike, before any watchdog can react.

An explosion goes from a healthy norm to 1e14 within a dozen steps — faster than
any scrape. OLMo-core's SkipStepOptimizer skips a step whose gradient norm exceeds
mean + 6σ of the last 128 steps; gradwatch uses the same test but clips such a step
to that bound instead of skipping it, so a genuine change of regime slows training
down rather than freezing it. Clipped spikes stay out of the history (an explosion
would otherwise ratchet its own bound up ~10 % a step), so the bound keeps holding
if the watchdog never answers. Once the watchdog enables clipping, its clipping takes over.
"""

from __future__ import annotations

import math
from collections import deque

WINDOW = 128
WARMUP = 128  # a full window: early-training norms move fast and are not spikes


class SpikeGuard:
    def __init__(self, sigma: float, window: int = WINDOW, warmup: int = WARMUP) -> None:
        self.sigma = sigma
        self.warmup = warmup
        self.norms: deque[float] = deque(maxlen=window)
        # Mean and sum of squared deviations of `norms`, updated as values come and go
        # (Welford's update, run both ways) and recomputed exactly once per window of records,
        # so rounding cannot accumulate over a long run.
        self._mean = 0.0
        self._m2 = 0.0
        self._until_exact = window

    def bound(self) -> float | None:
        """The largest acceptable global norm for the next step; None while warming up."""
        n = len(self.norms)
        if n < self.warmup:
            return None
        return self._mean + self.sigma * math.sqrt(max(self._m2, 0.0) / n)

    def record(self, norm: float) -> None:
        """The global norm of a step applied unclipped."""
        if not math.isfinite(norm):
            return
        norms = self.norms
        if len(norms) == norms.maxlen:
            old = norms.popleft()
            if norms:
                mean = self._mean - (old - self._mean) / len(norms)
                self._m2 -= (old - self._mean) * (old - mean)
                self._mean = mean
        norms.append(norm)
        delta = norm - self._mean
        self._mean += delta / len(norms)
        self._m2 += delta * (norm - self._mean)
        self._until_exact -= 1
        if self._until_exact == 0:
            self._exact()

    def _exact(self) -> None:
        n = len(self.norms)
        self._mean = math.fsum(self.norms) / n if n else 0.0
        self._m2 = math.fsum((x - self._mean) ** 2 for x in self.norms)
        self._until_exact = self.norms.maxlen

    def state_dict(self) -> dict:
        return {"norms": list(self.norms)}

    def load_state_dict(self, state: dict) -> None:
        self.norms.clear()
        self.norms.extend(state["norms"])
        self._exact()
