"""One prometheus-client Collector that renders the agent's telemetry, and the cached exposition the server sends.

A scrape must cost the training thread nothing, however often it comes. Only the
server's thread renders (never the training thread), and each part of the text
is rendered at most once per change of what it shows:
- the per-layer families (thousands of lines on a large model), once per change of
  the layer tables (sampled steps). That rendering runs in small pieces between the
  server's other work, each holding the GIL briefly; until it is done, scrapes get
  the previous complete copy;
- the scalars and counters (a few dozen lines), once per telemetry version;
- the per-scraper peaks, a few lines for each scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

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
_EOF = b"# EOF\n"  # OpenMetrics' terminator: once, at the very end
_PIECE = 16
"""Samples per piece of the per-layer rendering (about 0.2 ms of the GIL each)."""
_FORMATS = 4
"""Content types cached at once (the Accept header is the scraper's to choose)."""


class _Families:
    """What prometheus-client's encoders take: anything with collect()."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class _Rendering:
    """The per-layer text of one layer-table version in one format, built piece by piece."""

    def __init__(self, version: int, pieces: Iterator[bytes]) -> None:
        self.version = version
        self.pieces = pieces
        self.done: list[bytes] = []


class GradwatchCollector(Collector):
    """Reads the latest :class:`Telemetry` view, for a registry (``collect``) or a scrape (``exposition``)."""

    def __init__(self, telemetry: Telemetry, run: str, rank: int) -> None:
        self.telemetry = telemetry
        self.base = {"run": run, "rank": str(rank)}
        self._live_text: dict[str, tuple[int, bytes]] = {}  # content type -> (version, text)
        self._layer_text: dict[str, tuple[int, bytes]] = {}  # content type -> (layers_version, text)
        self._rendering: dict[str, _Rendering] = {}  # content type -> the per-layer text being built
        self._warn = Throttled(log)

    def collect(self) -> Iterator[Metric]:
        try:
            view = self.telemetry.read()
            families = [*self._live(view), *self._peaks(view), *self._layer_families(view)]
        except Exception as exc:  # a scrape must never take the trainer down, nor go silent
            self._warn.warning("render", "gradwatch: rendering metrics failed: %r", exc)
            return
        yield from families

    # -- the server's thread ---------------------------------------------------------------

    def exposition(self, address: str, user_agent: str, accept: str) -> tuple[bytes, str]:
        """The body and content type for one scrape (the server's thread, one scrape at a time).

        ``address`` and ``user_agent`` name the scraper for its peaks; ``accept`` picks the format.
        """
        encoder, content_type = choose_encoder(accept)
        key, consumer = scraper_slot(address, user_agent)
        try:
            view = self.telemetry.read(key, consumer)
            live = self._live_text.get(content_type)
            if live is None or live[0] != view.version:
                if len(self._live_text) >= _FORMATS:
                    self._live_text.clear()
                live = self._live_text[content_type] = (view.version, encoder(_Families(self._live(view))))
            parts = [live[1], encoder(_Families(self._peaks(view))), self._layers(view, encoder, content_type)]
        except Exception as exc:
            self._warn.warning("render", "gradwatch: rendering metrics failed: %r", exc)
            return encoder(_Families([])), content_type
        body = b"".join(part.removesuffix(_EOF) for part in parts)
        return (body + _EOF if content_type.startswith("application/openmetrics-text") else body), content_type

    def render_step(self) -> bool:
        """Build one piece of a pending per-layer rendering; True while any remains.
        The server's thread calls it between requests, resting after each piece."""
        if not self._rendering:
            return False
        self._advance(next(iter(self._rendering)))
        return bool(self._rendering)

    def _layers(self, view: View, encoder, content_type: str) -> bytes:
        """The per-layer text: the latest complete copy; a newer one is started if the tables changed."""
        cached = self._layer_text.get(content_type)
        if (cached is None or cached[0] != view.layers_version) and content_type not in self._rendering:
            if len(self._rendering) >= _FORMATS:
                self._rendering.clear()
            self._rendering[content_type] = _Rendering(view.layers_version, self._layer_pieces(view, encoder))
        if cached is None:  # nothing to serve yet (the first scrape in this format): finish it now
            while content_type in self._rendering:
                self._advance(content_type)
            cached = self._layer_text[content_type]
        return cached[1]

    def _advance(self, content_type: str) -> None:
        rendering = self._rendering[content_type]
        try:
            piece = next(rendering.pieces, None)
        except Exception as exc:
            del self._rendering[content_type]
            self._warn.warning("render", "gradwatch: rendering metrics failed: %r", exc)
            return
        if piece is not None:
            rendering.done.append(piece)
            return
        del self._rendering[content_type]
        if len(self._layer_text) >= _FORMATS and content_type not in self._layer_text:
            self._layer_text.clear()
        self._layer_text[content_type] = (rendering.version, b"".join(rendering.done))

    def _layer_pieces(self, view: View, encoder) -> Iterator[bytes]:
        """The per-layer families, ``_PIECE`` samples at a time; a family's HELP and TYPE once."""
        for family in self._layer_families(view):
            samples = family.samples
            for start in range(0, max(len(samples), 1), _PIECE):
                part = Metric(family.name, family.documentation, family.type)
                part.samples = samples[start : start + _PIECE]
                text = encoder(_Families([part]))
                if start:
                    text = b"".join(line for line in text.splitlines(keepends=True) if not line.startswith(b"# "))
                yield text.removesuffix(_EOF)

    # -- families ---------------------------------------------------------------------------

    def _gauge(self, name: str, doc: str, value: float | None, **labels: str) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=[*self.base, *labels])
        if value is not None:
            family.add_metric([*self.base.values(), *labels.values()], value)
        return family

    def _live(self, v: View) -> list[Metric]:
        """Scalars and counters: a few dozen lines, rendered once per telemetry version."""
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
        if v.loss_scale is not None:
            out.append(self._gauge(m.LOSS_SCALE, "GradScaler's loss scale at the latest measured step.", v.loss_scale))
        out.extend(self._guard(v))
        out.extend(self._counters(v))
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
        out.append(
            self._gauge(
                m.GUARD_HELD_RATIO_MAX,
                "Largest held step's global norm / median of the guard's accepted norms since this scraper's "
                "previous scrape (finite spikes the guard clipped; 0: none).",
                v.peaks.get("guard_held_ratio", 0.0),
            )
        )
        return out

    def _guard(self, v: View) -> Iterator[Metric]:
        """The spike guard's state (contract 4), for the rules that tell a held or lost run (its held-ratio
        peak is among the per-scrape peaks)."""
        yield self._gauge(m.GUARD_HELD_FRACTION, "Share of the last 50 optimizer steps the guard clipped or skipped.",
                          v.guard_held_fraction)
        if v.guard_held_step is not None:
            yield self._gauge(m.GUARD_HELD_STEP, "Step number of the latest step the guard clipped or skipped.",
                              v.guard_held_step)
        if v.guard_bound is not None:
            yield self._gauge(m.GUARD_BOUND, "The guard's spike bound on the global gradient norm for the next step.",
                              v.guard_bound)

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
            "Steps whose gradient norm exceeded the guard's bound (median + spike_sigma x MAD-sigma of accepted steps), clipped by the guard.",
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
