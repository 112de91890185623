"""The latest measurements, written by the training thread and read at scrape time.

The training step replaces whole values under a short lock (counters are copied
on write), so a read is a shallow copy and never walks the per-layer tables.
Two version numbers tell the exporter what changed since it last rendered: one
for any change, one for the per-layer tables (the bulk of the text, changed on
sampled steps only).

Spike-sensitive values (global gradient norm, loss) also keep, for each scraper,
their maximum since that scraper's previous scrape: Prometheus and the watchdog
may both scrape one agent, and a max that any scrape reset would let one of them
miss a one-step spike. The registered consumers (the watchdog and Prometheus,
told apart by User-Agent) have slots of their own that other scrapers cannot evict.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from gradwatch.agent.layers import LayerValues

PEAKED = ("grad_global_norm", "loss", "guard_held_ratio")
LAYER_TABLES = frozenset({"layers", "update_ratio", "depth"})
"""Fields the exporter renders as per-layer families, cached by ``layers_version``."""
MAX_SCRAPERS = 8
"""Peak slots for scrapers that are not registered consumers (least recently seen evicted first)."""
MAX_CONSUMERS = 4
"""Peak slots for registered consumers, e.g. one watchdog and an HA pair of Prometheus servers."""
CONSUMER_AGENTS = ("gradwatch-watchdog", "Prometheus")
"""User-Agent products of the registered consumers (watchdog/sources/scrape.py, Prometheus's scraper)."""


def scraper_slot(address: str, user_agent: str) -> tuple[object, bool]:
    """The peak slot of one scraper and whether it is a registered consumer.

    A consumer is keyed by its address and product name, so an upgrade (a new
    version in its User-Agent) keeps its slot. Identification is not authenticated:
    a client that copies the watchdog's User-Agent from the watchdog's address shares its slot.
    """
    product = user_agent.split("/", 1)[0].strip()
    if product in CONSUMER_AGENTS:
        return (address, product), True
    return (address, user_agent), False


@dataclass
class View:
    """A consistent copy of everything the exporter renders. Containers are shared, never changed."""

    step: int = 0
    loss: float | None = None
    grad_global_norm: float | None = None
    peaks: dict[str, float] = field(default_factory=dict)
    learning_rates: list[float] = field(default_factory=list)
    lr_scale: float = 1.0
    clipping_active: bool = False
    clip_threshold: float | None = None
    loss_scale: float | None = None  # GradScaler's scale at the latest measured step, when watched
    layers: Mapping[str, LayerValues] = field(default_factory=dict)
    update_ratio: dict[str, float] = field(default_factory=dict)
    depth: dict[str, int] = field(default_factory=dict)
    nonfinite: Counter = field(default_factory=Counter)  # (layer, kind) -> elements
    skipped: Counter = field(default_factory=Counter)  # reason -> steps
    spike_clipped: Counter = field(default_factory=Counter)  # mode -> steps the guard clipped
    commands: Counter = field(default_factory=Counter)  # action -> applied
    # The spike guard (contract 4): held share of the last 50 steps, latest held step, next step's bound.
    guard_held_fraction: float = 0.0
    guard_held_step: int | None = None
    guard_bound: float | None = None
    version: int = 0  # bumped by every change
    layers_version: int = 0  # bumped by every change of a LAYER_TABLES field


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
        self._peaks: dict[bool, OrderedDict[object, dict[str, float]]] = {True: OrderedDict(), False: OrderedDict()}

    def update(self, **values) -> None:
        """Set fields of the view (names as in :class:`View`); a container passed here must not be changed later."""
        with self._lock:
            v = self._view
            for name, value in values.items():
                setattr(v, name, value)
            v.version += 1
            if not LAYER_TABLES.isdisjoint(values):
                v.layers_version += 1

    def record_peak(self, name: str, value: float) -> None:
        """Fold one step's value of a spike-sensitive quantity into every scraper's running max."""
        with self._lock:
            for pool in self._peaks.values():
                for peaks in pool.values():
                    peaks[name] = _fmax(peaks.get(name), value)

    def count(self, counter: str, key, n: int = 1) -> None:
        with self._lock:
            v = self._view
            copy = Counter(getattr(v, counter))  # copy on write: readers hold the old one
            copy[key] += n
            setattr(v, counter, copy)
            v.version += 1

    def read(self, scraper: object = None, consumer: bool = False) -> View:
        """Copy of the view; ``peaks`` holds the maxima since ``scraper``'s previous read.

        A scraper seen for the first time, or one with no step since its last read,
        gets the latest values instead. ``consumer`` puts the scraper's slot among the
        registered consumers' (see :func:`scraper_slot`).
        """
        with self._lock:
            v = self._view
            pool, cap = self._peaks[consumer], MAX_CONSUMERS if consumer else MAX_SCRAPERS
            peaks = pool.pop(scraper, {})
            pool[scraper] = {}
            while len(pool) > cap:
                pool.popitem(last=False)
            # guard_held_ratio: the largest held step's ratio since this scraper's last read, 0 when none
            latest = {"grad_global_norm": v.grad_global_norm, "loss": v.loss, "guard_held_ratio": 0.0}
            merged = {k: peaks.get(k, latest[k]) for k in PEAKED}
            return dataclasses.replace(v, peaks={k: value for k, value in merged.items() if value is not None})
