"""One prometheus-client Collector that renders the agent's telemetry, and the cached exposition the server sends.

A scrape must cost the training thread nothing, however often it comes. The
server's thread renders (never the training thread), and each part of the text
is rendered at most once per change of what it shows: the per-layer bulk once
per bulk version (sampled steps, counter changes), the few per-step scalars once
per version; only the per-scraper peaks are rendered for each scrape (a few lines).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from gradwatch.agent.telemetry import Telemetry, View, scraper_slot
from gradwatch.agent.throttle import Throttled
from gradwatch.watchdog import metric_names as m

log = logging.getLogger("gradwatch.agent")

_PER_LAYER = (
    (m.GRAD_NORM, "grad_norm", "Gradient L2 norm of the layer."),
    (m.GRAD_ABS_MEAN, "grad_abs_mean", "Mean |g| of the layer's gradient."),
    (m.GRAD_ABS_MAX, "grad_abs_max", "Max |g| of the layer's gradient."),
    (m.GRAD_ABS_MIN, "grad_abs_min", "Min |g| of the layer's gradient (sampled every detail_every steps)."),
    (m.PARAM_NORM, "param_norm", "Parameter L2 norm of the layer."),
)
_EOF = b"# EOF\n"  # OpenMetrics' terminator: only once, at the very end
_CACHE_ENTRIES = 8  # (part, content type) pairs kept; Accept headers are the scraper's to choose


class _Families:
    """What prometheus-client's encoders take: anything with collect()."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class GradwatchCollector(Collector):
    """Reads the latest :class:`Telemetry` view, for a registry (``collect``) or a scrape (``exposition``)."""

    def __init__(self, telemetry: Telemetry, run: str, rank: int) -> None:
        self.telemetry = telemetry
        self.base = {"run": run, "rank": str(rank)}
        self._cache: dict[tuple[str, str], tuple[int, bytes]] = {}
        self._warn = Throttled(log)

    def collect(self) -> Iterator[Metric]:
        try:
            view = self.telemetry.read()
            families = [*self._live(view), *self._peaks(view), *self._bulk(view)]
        except Exception as exc:  # a scrape must never take the trainer down, nor go silent
            self._warn.warning("render", "gradwatch: rendering metrics failed: %r", exc)
            return
        yield from families

    def exposition(self, address: str, user_agent: str, accept: str) -> tuple[bytes, str]:
        """The body and content type for one scrape (the server's thread calls it, one scrape at a time).

        ``address`` and ``user_agent`` name the scraper for its peaks; ``accept`` picks the format.
        """
        encoder, content_type = choose_encoder(accept)
        key, consumer = scraper_slot(address, user_agent)
        try:
            view = self.telemetry.read(key, consumer)
            parts = [
                self._cached("live", view.version, content_type, lambda: encoder(_Families(self._live(view)))),
                encoder(_Families(self._peaks(view))),
                self._cached("bulk", view.bulk_version, content_type, lambda: self._render_bulk(encoder, view)),
            ]
        except Exception as exc:
            self._warn.warning("render", "gradwatch: rendering metrics failed: %r", exc)
            return encoder(_Families([])), content_type
        if parts[-1].endswith(_EOF):
            parts = [p.removesuffix(_EOF) for p in parts[:-1]] + parts[-1:]
        return b"".join(parts), content_type

    def _cached(self, part: str, version: int, content_type: str, render: Callable[[], bytes]) -> bytes:
        entry = self._cache.get((part, content_type))
        if entry is not None and entry[0] == version:
            return entry[1]
        body = render()
        if len(self._cache) >= _CACHE_ENTRIES:
            self._cache.clear()
        self._cache[(part, content_type)] = (version, body)
        return body

    def _render_bulk(self, encoder: Callable, view: View) -> bytes:
        """One family at a time, letting the training thread have the GIL between them
        (a 400-layer family is ~1 ms of Python)."""
        chunks = []
        for family in self._bulk(view):
            chunks.append(encoder(_Families([family])))
            time.sleep(0)  # releases the GIL
        if not chunks:
            return encoder(_Families([]))
        return b"".join(c.removesuffix(_EOF) for c in chunks[:-1]) + chunks[-1]

    def _gauge(self, name: str, doc: str, value: float | None, **labels: str) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=[*self.base, *labels])
        if value is not None:
            family.add_metric([*self.base.values(), *labels.values()], value)
        return family

    def _live(self, v: View) -> list[Metric]:
        """The per-step scalars (telemetry.LIVE): a few lines, rendered once per version."""
        out = [self._gauge(m.STEP, "Optimizer steps attempted (skipped steps included).", v.step)]
        if v.loss is not None:
            out.append(self._gauge(m.LOSS, "Latest loss reported with Agent.observe().", v.loss))
        if v.grad_global_norm is not None:
            out.append(self._gauge(m.GRAD_GLOBAL_NORM, "Global gradient L2 norm (latest measured step).", v.grad_global_norm))
        lr = GaugeMetricFamily(m.LEARNING_RATE, "Effective learning rate per param group.", labels=[*self.base, "group"])
        for i, value in enumerate(v.learning_rates):
            lr.add_metric([*self.base.values(), str(i)], value)
        out.append(lr)
        out.append(self._gauge(m.LR_SCALE, "Remediation multiplier on the scheduled learning rate.", v.lr_scale))
        out.append(self._gauge(m.CLIPPING_ACTIVE, "1 while gradwatch clips gradients.", float(v.clipping_active)))
        if v.clip_threshold is not None:
            out.append(self._gauge(m.CLIP_THRESHOLD, "Current clipping threshold.", v.clip_threshold))
        return out

    def _peaks(self, v: View) -> list[Metric]:
        """Maxima since this scraper's previous scrape: rendered for every scrape."""
        out = []
        if "loss" in v.peaks:
            out.append(self._gauge(m.LOSS_MAX, "Max loss since this scraper's previous scrape.", v.peaks["loss"]))
        if "grad_global_norm" in v.peaks:
            out.append(
                self._gauge(
                    m.GRAD_GLOBAL_NORM_MAX,
                    "Max global gradient L2 norm since this scraper's previous scrape.",
                    v.peaks["grad_global_norm"],
                )
            )
        return out

    def _bulk(self, v: View) -> Iterator[Metric]:
        """Per-layer families and counters: rendered once per bulk version."""
        yield from self._layer_families(v)
        yield from self._counters(v)

    def _layer_families(self, v: View) -> Iterator[Metric]:
        labels = [*self.base, "layer"]
        for name, attr, doc in _PER_LAYER:
            family = GaugeMetricFamily(name, doc, labels=labels)
            for layer, values in v.layers.items():
                family.add_metric([*self.base.values(), layer], getattr(values, attr))
            yield family
        ratio = GaugeMetricFamily(m.UPDATE_RATIO, "mean|w_after - w_before| / mean|w_before| (DL4J).", labels=labels)
        for layer, value in v.update_ratio.items():
            ratio.add_metric([*self.base.values(), layer], value)
        yield ratio
        depth = GaugeMetricFamily(m.LAYER_DEPTH, "Layer position in model order (0 = first).", labels=labels)
        for layer in v.layers:
            if layer in v.depth:
                depth.add_metric([*self.base.values(), layer], v.depth[layer])
        yield depth

    def _counters(self, v: View) -> Iterator[Metric]:
        nonfinite = CounterMetricFamily(
            m.NONFINITE_GRADS_TOTAL, "NaN/Inf gradient elements seen, by layer and kind.", labels=[*self.base, "layer", "kind"]
        )
        for (layer, kind), n in sorted(v.nonfinite.items()):
            nonfinite.add_metric([*self.base.values(), layer, kind], n)
        yield nonfinite
        skipped = CounterMetricFamily(m.SKIPPED_STEPS_TOTAL, "Optimizer steps skipped, by reason.", labels=[*self.base, "reason"])
        for reason, n in sorted(v.skipped.items()):
            skipped.add_metric([*self.base.values(), reason], n)
        yield skipped
        spikes = CounterMetricFamily(
            m.SPIKE_CLIPPED_STEPS_TOTAL,
            "Steps whose gradient norm exceeded mean + spike_sigma x std of recent steps, clipped by the guard.",
            labels=self.base,
        )
        spikes.add_metric(list(self.base.values()), sum(v.spike_clipped.values()))
        yield spikes
        commands = CounterMetricFamily(
            m.COMMANDS_APPLIED_TOTAL, "Watchdog commands applied, by action.", labels=[*self.base, "action"]
        )
        for action, n in sorted(v.commands.items()):
            commands.add_metric([*self.base.values(), action], n)
        yield commands
