"""The latest measurements, written by the training thread and read at scrape time.

The training step replaces whole values under a short lock; the exporter copies
them out. Spike-sensitive values (global gradient norm, loss) also keep, for each
scraper, their maximum since that scraper's previous scrape: Prometheus and the
watchdog may both scrape one agent, and a max that any scrape reset would let one
of them miss a one-step spike.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from gradwatch.agent.layers import LayerValues

PEAKED = ("grad_global_norm", "loss")
MAX_SCRAPERS = 8


@dataclass
class View:
    """A consistent copy of everything the exporter renders."""

    step: int = 0
    loss: float | None = None
    grad_global_norm: float | None = None
    peaks: dict[str, float] = field(default_factory=dict)
    learning_rates: list[float] = field(default_factory=list)
    lr_scale: float = 1.0
    clipping_active: bool = False
    clip_threshold: float | None = None
    loss_scale: float | None = None  # GradScaler's scale at the latest measured step, when watched
    layers: Mapping[str, LayerValues] = field(default_factory=dict)  # replaced whole, never changed: shared
    update_ratio: dict[str, float] = field(default_factory=dict)
    depth: dict[str, int] = field(default_factory=dict)
    nonfinite: Counter = field(default_factory=Counter)  # (layer, kind) -> elements
    skipped: Counter = field(default_factory=Counter)  # reason -> steps
    spike_clipped: Counter = field(default_factory=Counter)  # mode -> steps the guard clipped
    commands: Counter = field(default_factory=Counter)  # action -> applied


def _fmax(a: float | None, b: float) -> float:
    if a is None or math.isnan(a):
        return b
    return a if math.isnan(b) else max(a, b)


class Telemetry:
    def __init__(self, depth: dict[str, int]) -> None:
        self._lock = threading.Lock()
        # Skip counters exist at 0 from the start, so PromQL's increase() sees the first event.
        self._view = View(
            depth=depth,
            skipped=Counter({"nonfinite": 0, "nonfinite_peer": 0}),
            spike_clipped=Counter({"global_norm": 0}),
        )
        self._peaks: OrderedDict[object, dict[str, float]] = OrderedDict()

    def update(self, **values) -> None:
        """Set fields of the view (names as in :class:`View`)."""
        with self._lock:
            for name, value in values.items():
                setattr(self._view, name, value)

    def record_peak(self, name: str, value: float) -> None:
        """Fold one step's value of a spike-sensitive quantity into every scraper's running max."""
        with self._lock:
            for peaks in self._peaks.values():
                peaks[name] = _fmax(peaks.get(name), value)

    def count(self, counter: str, key, n: int = 1) -> None:
        with self._lock:
            getattr(self._view, counter)[key] += n

    def read(self, scraper: object = None) -> View:
        """Copy of the view; ``peaks`` holds the maxima since ``scraper``'s previous read.

        A scraper seen for the first time, or one with no step since its last read,
        gets the latest values instead.
        """
        with self._lock:
            v = self._view
            peaks = self._peaks.pop(scraper, {})
            self._peaks[scraper] = {}
            while len(self._peaks) > MAX_SCRAPERS:
                self._peaks.popitem(last=False)
            latest = {"grad_global_norm": v.grad_global_norm, "loss": v.loss}
            return View(
                step=v.step,
                loss=v.loss,
                grad_global_norm=v.grad_global_norm,
                peaks={k: peaks.get(k, latest[k]) for k in PEAKED if peaks.get(k, latest[k]) is not None},
                learning_rates=list(v.learning_rates),
                lr_scale=v.lr_scale,
                clipping_active=v.clipping_active,
                clip_threshold=v.clip_threshold,
                loss_scale=v.loss_scale,
                layers=v.layers,
                update_ratio=dict(v.update_ratio),
                depth=v.depth,
                nonfinite=Counter(v.nonfinite),
                skipped=Counter(v.skipped),
                spike_clipped=Counter(v.spike_clipped),
                commands=Counter(v.commands),
            )
