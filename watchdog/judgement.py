"""Is the run being harmed? The evidence a policy needs before it makes a lasting change.

A gradient rise alone is not harm. Healthy runs jump too: a network leaving a plateau
(the loss falling sharply) can raise its gradient norm 20-60x within a few steps, LR
warm-up and a new data mixture raise it too. Clipping that stays on and LR cuts slow
such a run down for the rest of its life, so a lasting remediation (``lower_lr``,
``enable_clipping``, ``rollback``, ``stop``) waits for evidence that the run is being
harmed, read from the samples the watchdog holds for that run and rank:

* **non-finite** — a step skipped for NaN/Inf gradients since the onset (or just before
  it), or a NaN/Inf loss now. Always harm.
* **loss rising** — the last ``CONSECUTIVE`` loss samples are all at least ``LOSS_RISE``
  times the median loss of the ``REFERENCE_S`` before the onset: llm-foundry's
  KillLossSpike test (2x the window mean for 5 consecutive steps) made one notch more
  sensitive, since here it only confirms an alert that already fired. Three scrapes in
  a row keep one hard batch out (per-batch loss spread of 35 %: p ~ 5e-4 a round).
* **loss spike** — a scraped loss maximum at least ``LOSS_SPIKE`` times that reference
  (the same 2x as llm-foundry and the default pack's LossSpike).
* **growing** — the gradient norm keeps rising: each of the last ``CONSECUTIVE`` scraped
  maxima above the one before, at least ``GROWTH`` times the first of them, and at least
  ``GROWN`` times the reference. An explosion grows geometrically (BLOOM-176B: 0.24 ->
  960 in five steps, before the loss moved); a learning transition jumps, then levels off.
  Counts only while the loss is not improving: BLOOM's norm leads its loss by a few
  steps, and a loss that falls while the norm rises is a network that is learning.

Counter-evidence is recorded too: a loss below its pre-onset level ("improving") is
what a learning transition looks like. No loss reported at all leaves only the
gradient-side evidence (non-finite, growing).

Pure: reads a :class:`SampleStore`, decides nothing else, keeps no state.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from gradwatch.watchdog import metric_names as mn
from gradwatch.watchdog.samples import SampleStore, Series

REFERENCE_S = 120.0
"""The window before the onset whose median loss and norm are the run's level before the incident."""
NONFINITE_LOOKBACK_S = 60.0
"""A non-finite step this long before the onset still belongs to the incident (a NaN batch often comes first)."""
CONSECUTIVE = 3
LOSS_RISE = 1.5
LOSS_SPIKE = 2.0
GROWTH = 2.0
GROWN = 10.0
IMPROVING = 0.95
"""The loss's recent median at most this times its pre-onset level: improving."""

HISTORY_S = 600.0
"""How long the series judged here are kept (the reference before an onset, then the incident itself)."""
JUDGED_METRICS = (mn.STEP, mn.LOSS, mn.LOSS_MAX, mn.GRAD_GLOBAL_NORM_MAX, mn.SKIPPED_STEPS_TOTAL)

LASTING_ACTIONS = frozenset({"lower_lr", "enable_clipping", "rollback", "stop"})
"""Actions that change the rest of the run; ``checkpoint`` and the undoing actions do not need evidence."""


@dataclass(frozen=True)
class Evidence:
    """What the samples say about one run (and rank) since an incident's onset."""

    harm: list[str] = field(default_factory=list)
    against: list[str] = field(default_factory=list)
    known: bool = True
    """False when the watchdog holds no sample of the run at all (nothing to judge by)."""

    @property
    def harmful(self) -> bool:
        return bool(self.harm)

    def summary(self) -> str:
        if not self.known:
            return "no samples of this run to judge by"
        parts = [f"harm: {'; '.join(self.harm)}" if self.harm else "no evidence of harm"]
        if self.against:
            parts.append(f"against: {'; '.join(self.against)}")
        return " — ".join(parts)


ALWAYS = Evidence(harm=["asked without judgement"])
"""For callers that decided already (tests of the policy mechanics, an operator)."""


def _points(samples: SampleStore, metric: str, match: dict[str, str], start: float, end: float) -> list[tuple[float, float]]:
    """Every point of ``metric`` for the run (all matching series merged, by time) with start < t <= end."""
    out: list[tuple[float, float]] = []
    for series in samples.select(metric, match):
        out.extend(series.window(end, end - start))
    out.sort()
    return out


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _counter_rise(series: list[Series], start: float, end: float) -> float:
    """How much counters rose within (start, end]."""
    rise = 0.0
    for s in series:
        inside = s.window(end, end - start)
        if not inside:
            continue
        before = s.latest(start, lookback_s=math.inf)
        # Agents export their skip counters at 0 from the start; a series first seen inside the
        # window (a watchdog restart) counts only the rises seen, not its old total.
        base = before[1] if before is not None else inside[0][1]
        rise += max(inside[-1][1] - base, 0.0)
    return rise


def judge(
    samples: SampleStore, run: str, rank: str | None, onset: float, now: float,
    nonfinite_lookback_s: float = NONFINITE_LOOKBACK_S,
) -> Evidence:
    """The evidence of harm to ``run`` (one ``rank``, or all when None) between ``onset`` and ``now``;
    non-finite steps count from ``nonfinite_lookback_s`` before the onset (0 to judge a window alone)."""
    match = {"run": run} if rank is None else {"run": run, "rank": rank}
    if not any(True for _ in samples.select(mn.STEP, match)):
        return Evidence(known=False)
    harm: list[str] = []
    against: list[str] = []

    skipped = _counter_rise(
        list(samples.select(mn.SKIPPED_STEPS_TOTAL, {**match, "reason": "nonfinite"})), onset - nonfinite_lookback_s, now
    )
    if skipped > 0:
        harm.append(f"{skipped:g} step(s) skipped for NaN/Inf gradients")

    reference = _points(samples, mn.LOSS, match, onset - REFERENCE_S, onset)
    recent = _points(samples, mn.LOSS, match, onset - 1e-9, now)[-CONSECUTIVE:]
    if recent and not math.isfinite(recent[-1][1]):
        harm.append(f"the loss is {recent[-1][1]} now")
    base = statistics.median(_finite([v for _, v in reference]) or [math.nan])
    improving = False
    if math.isfinite(base) and base > 0 and len(recent) == CONSECUTIVE:
        values = [v for _, v in recent]
        if all(math.isfinite(v) and v >= LOSS_RISE * base for v in values):
            harm.append(f"loss rising: last {CONSECUTIVE} samples >= {LOSS_RISE:g}x its level before the onset ({base:.4g})")
        elif all(math.isfinite(v) for v in values) and statistics.median(values) <= IMPROVING * base:
            improving = True
            against.append(f"loss improving: {statistics.median(values) / base:.2f}x its level before the onset")
        peaks = _finite([v for _, v in _points(samples, mn.LOSS_MAX, match, onset - 1e-9, now)])
        if peaks and max(peaks) >= LOSS_SPIKE * base:
            harm.append(f"loss spike: {max(peaks) / base:.3g}x its level before the onset")

    norms = [v for _, v in _points(samples, mn.GRAD_GLOBAL_NORM_MAX, match, onset - 1e-9, now)][-(CONSECUTIVE + 1):]
    before = _finite([v for _, v in _points(samples, mn.GRAD_GLOBAL_NORM_MAX, match, onset - REFERENCE_S, onset)])
    level = statistics.median(before) if before else math.nan
    if len(norms) == CONSECUTIVE + 1 and all(math.isfinite(v) and v > 0 for v in norms):
        rising = all(b > a for a, b in zip(norms, norms[1:]))
        if rising and norms[-1] >= GROWTH * norms[0] and (not math.isfinite(level) or norms[-1] >= GROWN * level):
            growth = f"gradient norm still growing: {norms[0]:.3g} -> {norms[-1]:.3g} over {CONSECUTIVE} scrapes"
            (against if improving else harm).append(growth + (" (while the loss improves)" if improving else ""))
    return Evidence(harm=harm, against=against)
