"""The guard's answer to a finite gradient spike, before any watchdog can react.

An explosion goes from a healthy norm to 1e14 within a dozen steps — faster than
any scrape — so the guard judges every step's global gradient norm against the
per-step history of the norms it accepted, and clips a spike to its bound (it does
not skip it: a genuine change of regime slows down rather than freezes).

**The bound** (robust, so that one exploded value cannot drag it up): with ``m`` the
median of the last 128 accepted norms and ``s = 1.4826 × MAD`` their robust standard
deviation, ``bound = max(m + σ·w·s, 3·w·m)``, ``σ`` = ``spike_sigma`` (6), where
``w = min(2, sqrt(64 / n))`` widens the bound while the history is short (n < 64).
Evidence: OLMo-core's SkipStepOptimizer, copied by Levanter and MaxText, skips a step
above mean + 6σ of the last 128 and decides nothing before 64 samples (FIELD_NOTES §3,
§5); gradwatch takes the same window and σ with the median and MAD instead of the mean
and standard deviation (an exploded value moves the mean and σ by its own size; the
median and MAD not at all), and instead of deciding nothing for 64 steps it decides from
``MIN_HISTORY`` (20) steps with a bound up to 2x wider that tightens as the history
grows: an explosion at step 25 is held, the normal swings of the first steps are not.
The ``3·m`` floor keeps a steady norm (MAD near 0) from calling its ordinary
batch-to-batch swings spikes; icefall's ScaledAdam clips routinely at 2x the median.

**The history** holds only accepted steps: never a held spike, a step clipped by the
guard, or a non-finite value, so an explosion cannot raise its own bound and the
watchdog's ``threshold: auto`` (from the same accepted steps, see remedy.py) cannot be
computed from exploded norms.

**Do no harm: when a held regime is accepted.** A gradient rise alone does not say the
run is in trouble. BLOOM-176B's grad norm led its loss by steps before a divergence,
but a network leaving a plateau (a recurrent net starting to recall, a grokking-like
transition) shows the same rise — 19-65x its recent median, and it stays up — while
its loss *falls*. The field's spike tests use the loss as the evidence: OLMo-core's
skip test watches the loss beside the gradient norm, llm-foundry's KillLossSpike acts
only on a loss at 2x its window mean for 5 steps. So, while a run of consecutive steps
is held, the guard looks at the loss that ``observe()`` reported for each of them:

- it accepts the new norm regime when the last ``CONFIRM`` (3) held steps all had a
  finite loss no higher than the highest loss of the last 16 accepted steps, or than the
  loss of the first held step if that was higher (the loss is not rising vs its pre-spike
  level; the first held step's loss was measured before any held update, so a new data
  source that raises loss and norm together is judged by what follows), and their norm did not double from the first of
  them to the last (the norm is not growing step over step) — or when all their losses
  are below the lowest of those 16 (the run is learning faster than before, however
  fast the norm grows: a network escaping a saddle); their norms become the new history
  and the bound follows them (the last of those steps is applied unclipped);
- it keeps holding otherwise: an explosion (the norm growing step over step, or the
  loss rising) stays held, with its share of steps exported for the watchdog
  (``gradwatch_guard_held_fraction``).

Without any reported loss the guard has no evidence either way; it then accepts a new
regime only after ``CONFIRM_WITHOUT_LOSS`` (10) held steps whose norm did not double.
"""

from __future__ import annotations

import bisect
import math
from collections import deque

WINDOW = 128
"""Accepted norms kept (OLMo-core's window)."""
MIN_HISTORY = 20
"""Accepted steps before the first bound: early norms move fast, but not by orders of magnitude."""
FULL_HISTORY = 64
"""From this many accepted steps the bound has its full width (OLMo-core's first decision)."""
MAX_WIDEN = 2.0
"""How much wider the bound is at its shortest history."""
RATIO_FLOOR = 3.0
"""The bound is never below this x the median (a steady norm's MAD is near 0)."""
MAD_TO_SIGMA = 1.4826
"""MAD x this = the standard deviation of normally distributed values."""
CONFIRM = 3
"""Consecutive held steps on a non-rising loss before a new norm regime is accepted."""
CONFIRM_WITHOUT_LOSS = 10
"""The same when no loss was reported."""
GROWTH = 2.0
"""A held norm that grows by this factor over the confirmation steps is an explosion."""
LOSS_HISTORY = 16
"""Losses of recent accepted steps: the pre-spike level a held step's loss is compared with."""
HELD_WINDOW = 50
"""Steps over which ``held_fraction`` is computed (issue 12: more than half of 50 is a lost run)."""


def median_of_sorted(values: list[float]) -> float:
    n = len(values)
    mid = n // 2
    return values[mid] if n % 2 else 0.5 * (values[mid - 1] + values[mid])


def _mad_of_sorted(values: list[float], median: float) -> float:
    """Median absolute deviation of sorted values, without a sort per step: the deviations
    below the median and those above it are two ascending runs; the k-th smallest of their
    union is found by bisection on how many of it come from the run below."""
    n = len(values)
    below = bisect.bisect_left(values, median)

    def low(i: int) -> float:  # i-th smallest deviation below the median (i < below)
        return median - values[below - 1 - i]

    def high(j: int) -> float:  # j-th smallest deviation above it (j < n - below)
        return values[below + j] - median

    def kth(k: int) -> float:
        lo, hi = max(0, k + 1 - (n - below)), min(k + 1, below)  # how many of the k+1 smallest are below
        while lo < hi:
            i = (lo + hi) // 2  # take i from below, k+1-i from above
            if high(k - i) > low(i):  # the next one below is smaller than the last one above: take more below
                lo = i + 1
            else:
                hi = i
        i = lo
        last = [low(i - 1)] if i > 0 else []
        if k + 1 - i > 0:
            last.append(high(k - i))
        return max(last)

    return kth(n // 2) if n % 2 else 0.5 * (kth(n // 2 - 1) + kth(n // 2))


def bound_of_sorted(values: list[float], sigma: float) -> float:
    """The spike bound of a sorted, non-empty history (see the module docstring)."""
    median = median_of_sorted(values)
    mad = _mad_of_sorted(values, median)
    widen = min(MAX_WIDEN, math.sqrt(FULL_HISTORY / len(values)))
    return max(median + sigma * widen * MAD_TO_SIGMA * mad, RATIO_FLOOR * widen * median)


class SpikeGuard:
    """Judges each finite global norm: ``judge`` says whether the step is applied as is or held."""

    def __init__(self, sigma: float, window: int = WINDOW) -> None:
        self.sigma = sigma
        self.norms: deque[float] = deque(maxlen=window)
        self._sorted: list[float] = []  # the same values, kept sorted (insert/remove by bisection)
        self._losses: deque[float] = deque(maxlen=LOSS_HISTORY)
        self._held: list[tuple[float, float | None]] = []  # (norm, loss) of the current run of held steps
        self._restarted = False  # the history restarted from an accepted regime: usable at once
        self._bound: float | None = None

    def bound(self) -> float | None:
        """The largest global norm the next step may have unheld; None while warming up."""
        return self._bound

    def centre(self) -> float | None:
        """The median of the accepted norms (what a held step's ratio is measured against)."""
        return median_of_sorted(self._sorted) if self._sorted else None

    def judge(self, norm: float, loss: float | None) -> str:
        """One step's finite global norm and its observed loss (None: none reported).

        Returns ``"accept"`` (applied as is, recorded), ``"regime"`` (a held run of steps
        confirmed as a new regime: applied as is, the history restarted from it) or
        ``"hold"`` (the caller clips the step to :meth:`bound`; nothing recorded).
        """
        bound = self._bound
        if bound is None or norm <= bound:
            self._held.clear()
            self._record(norm, loss)
            return "accept"
        self._held.append((norm, loss))
        if not self._confirmed():
            return "hold"
        self.restart([n for n, _ in self._held])
        return "regime"

    def _confirmed(self) -> bool:
        held = self._held
        have_loss = any(loss is not None for _, loss in held[-CONFIRM:])
        need = CONFIRM if have_loss else CONFIRM_WITHOUT_LOSS
        if len(held) < need:
            return False
        recent = held[-need:]
        losses = [loss for _, loss in recent]
        if have_loss and not all(loss is not None and math.isfinite(loss) for loss in losses):
            return False
        if have_loss and self._losses and all(loss < min(self._losses) for loss in losses):
            return True  # below every recent pre-spike loss: the run is learning, however fast the norm grows
        if recent[-1][0] > GROWTH * recent[0][0]:
            return False  # growing step over step: an explosion
        if not have_loss:
            return True
        # The level a held step's loss must not pass: the pre-spike one, or the loss of the first held
        # step if higher — that loss was measured before any held update was applied, so a data
        # switch that raised the loss and the norm together is judged by whether the loss rises *after* it.
        first = held[0][1]
        level = max(self._losses, default=math.inf)
        if first is not None and math.isfinite(first):
            level = max(level, first)
        return all(loss <= level for loss in losses)

    def _record(self, norm: float, loss: float | None) -> None:
        if len(self.norms) == self.norms.maxlen:
            del self._sorted[bisect.bisect_left(self._sorted, self.norms[0])]
        self.norms.append(norm)
        bisect.insort(self._sorted, norm)
        if loss is not None and math.isfinite(loss):
            self._losses.append(loss)
        self._update()

    def restart(self, norms: list[float]) -> None:
        """A confirmed new regime: its norms replace the history (the pre-spike losses stay
        the reference: the loss has to keep not rising for the next regime change too)."""
        self.norms.clear()
        self.norms.extend(norms)
        self._sorted = sorted(self.norms)
        self._held.clear()
        self._restarted = True
        self._update()

    def _update(self) -> None:
        n = len(self.norms)
        # A restarted history is usable from its first values (the run is past its first steps).
        self._bound = bound_of_sorted(self._sorted, self.sigma) if n >= MIN_HISTORY or (self._restarted and n) else None

    def state_dict(self) -> dict:
        return {"norms": list(self.norms), "losses": list(self._losses), "restarted": self._restarted}

    def load_state_dict(self, state: dict) -> None:
        self.norms.clear()
        self.norms.extend(state["norms"])
        self._sorted = sorted(self.norms)
        self._losses.clear()
        self._losses.extend(state.get("losses", []))
        self._restarted = bool(state.get("restarted", False))
        self._held.clear()
        self._update()


class HeldWindow:
    """Which of the last ``HELD_WINDOW`` optimizer steps the guard held (clipped or skipped)."""

    def __init__(self, size: int = HELD_WINDOW) -> None:
        self._steps: deque[bool] = deque(maxlen=size)
        self._held = 0

    def add(self, held: bool) -> None:
        if len(self._steps) == self._steps.maxlen:
            self._held -= self._steps[0]
        self._steps.append(held)
        self._held += held

    @property
    def fraction(self) -> float:
        """Held share of the last ``size`` steps (steps before the first count as not held)."""
        return self._held / self._steps.maxlen
