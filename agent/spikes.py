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

    def bound(self) -> float | None:
        """The largest acceptable global norm for the next step; None while warming up."""
        n = len(self.norms)
        if n < self.warmup:
            return None
        mean = sum(self.norms) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in self.norms) / n)
        return mean + self.sigma * std

    def record(self, norm: float) -> None:
        """The global norm of a step applied unclipped."""
        if math.isfinite(norm):
            self.norms.append(norm)

    def state_dict(self) -> dict:
        return {"norms": list(self.norms)}

    def load_state_dict(self, state: dict) -> None:
        self.norms.clear()
        self.norms.extend(state["norms"])
