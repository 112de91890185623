"""One prometheus-client Collector that renders the agent's telemetry at scrape time."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gradwatch.agent.telemetry import Telemetry, View
from gradwatch.watchdog import metric_names as m

log = logging.getLogger("gradwatch.agent")

_PER_LAYER = (
    (m.GRAD_NORM, "grad_norm", "Gradient L2 norm of the layer."),
    (m.GRAD_ABS_MEAN, "grad_abs_mean", "Mean |g| of the layer's gradient."),
    (m.GRAD_ABS_MAX, "grad_abs_max", "Max |g| of the layer's gradient."),
    (m.GRAD_ABS_MIN, "grad_abs_min", "Min |g| of the layer's gradient (sampled every detail_every steps)."),
    (m.PARAM_NORM, "param_norm", "Parameter L2 norm of the layer."),
)


class GradwatchCollector(Collector):
    """Reads the latest :class:`Telemetry` view; the scraper identity comes from the HTTP handler."""

    def __init__(self, telemetry: Telemetry, run: str, rank: int) -> None:
        self.telemetry = telemetry
        self.base = {"run": run, "rank": str(rank)}
        self._scraper = threading.local()

    def set_scraper(self, key: object) -> None:
        """Called by the HTTP handler's thread before rendering, so peaks are per scraper."""
        self._scraper.key = key

    def collect(self) -> Iterator[Metric]:
        try:
            view = self.telemetry.read(getattr(self._scraper, "key", None))
            yield from self._families(view)
        except Exception:  # a scrape must never take the trainer down, nor go silent
            log.exception("gradwatch: rendering metrics failed")

    def _gauge(self, name: str, doc: str, value: float | None, **labels: str) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=[*self.base, *labels])
        if value is not None:
            family.add_metric([*self.base.values(), *labels.values()], value)
        return family

    def _families(self, v: View) -> Iterator[Metric]:
        yield self._gauge(m.STEP, "Optimizer steps attempted (skipped steps included).", v.step)
        if v.loss is not None:
            yield self._gauge(m.LOSS, "Latest loss reported with Agent.observe().", v.loss)
        if "loss" in v.peaks:
            yield self._gauge(m.LOSS_MAX, "Max loss since this scraper's previous scrape.", v.peaks["loss"])
        if v.grad_global_norm is not None:
            yield self._gauge(m.GRAD_GLOBAL_NORM, "Global gradient L2 norm (latest measured step).", v.grad_global_norm)
        if "grad_global_norm" in v.peaks:
            yield self._gauge(
                m.GRAD_GLOBAL_NORM_MAX,
                "Max global gradient L2 norm since this scraper's previous scrape.",
                v.peaks["grad_global_norm"],
            )
        lr = GaugeMetricFamily(m.LEARNING_RATE, "Effective learning rate per param group.", labels=[*self.base, "group"])
        for i, value in enumerate(v.learning_rates):
            lr.add_metric([*self.base.values(), str(i)], value)
        yield lr
        yield self._gauge(m.LR_SCALE, "Remediation multiplier on the scheduled learning rate.", v.lr_scale)
        yield self._gauge(m.CLIPPING_ACTIVE, "1 while gradwatch clips gradients.", float(v.clipping_active))
        if v.clip_threshold is not None:
            yield self._gauge(m.CLIP_THRESHOLD, "Current clipping threshold.", v.clip_threshold)
        if v.loss_scale is not None:
            yield self._gauge(m.LOSS_SCALE, "GradScaler's loss scale at the latest measured step.", v.loss_scale)
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
