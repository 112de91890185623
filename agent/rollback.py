"""The `rollback` command inside the trainer: bounds, which state to go back to, and the batches to skip.

Applied between two steps on every rank at the same step (commands.py brings the
command there): the state comes back from the snapshot ring (snapshots.py) or from
the user's own checkpoints (``agent.on_rollback(fn)``), the step whose gradients
were just computed on the damaged state is skipped, and the next ``skip_batches``
calls of :meth:`should_skip` answer True.

Bounds, whatever the watchdog asks: at most ``max_rollbacks`` within
``rollback_window_steps`` steps attempted (a monotonic count: rolled-back steps count
too), and never to a state older than the previous rollback's target — a run that
needs to go further back than that is not being helped by going back. A refused
rollback is acknowledged as refused with the reason, so the watchdog's policy moves
on to its next rung (`stop`).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from gradwatch.agent import distributed
from gradwatch.agent.remedy import Refused, Remediation
from gradwatch.agent.snapshots import SnapshotConfig, SnapshotRing
from gradwatch.watchdog.schema import Rollback

log = logging.getLogger("gradwatch.agent")

T = TypeVar("T")

DEFAULT_BOUNDS = SnapshotConfig()
RISE = 10.0
"""A step whose global norm is this many times the median of recent accepted steps is no state to go back
to, even when the guard let it through (its bound is off while it warms up): Megatron-LM calls 10x its
running max "unexpectedly large", and the default pack's GradNormSpike fires at 10x."""
RISE_HISTORY = 128  # recent accepted norms the median is taken over (the spike guard's window)
RISE_MIN = 8  # fewer norms than this: no judgement (the first steps' norms move a lot)


class Rollbacks:
    def __init__(self, ring: SnapshotRing | None, remedy: Remediation, ranks: distributed.RankInfo,
                 set_step: Callable[[int], None]) -> None:
        self.ring = ring
        self.remedy = remedy
        self.ranks = ranks
        self.set_step = set_step
        config = ring.config if ring is not None else DEFAULT_BOUNDS
        self.max_rollbacks = config.max_rollbacks
        self.window = config.rollback_window_steps
        self.callbacks: list[Callable[[int], int]] = []
        self.attempted = 0  # optimizer steps attempted since attach; never rewound
        self._done: deque[int] = deque()  # `attempted` at each rollback applied
        self.floor = 0  # the previous rollback's target: never go back before it
        self._held_at: int | None = None  # `attempted` at the latest step the guard held
        self.held_step: int | None = None  # that step's number
        self._restored = False
        self.skip_remaining = 0
        self.batches = 0  # should_skip() calls so far: the index the next batch gets
        self.skipped: list[tuple[int, int]] = []  # (first, last) batch index of each skip ordered, inclusive
        self._norms: deque[float] = deque(maxlen=RISE_HISTORY)  # accepted global norms (snapshots on only)

    # -- every step ----------------------------------------------------------------------

    def after_step(self, step: int, held: bool, global_norm: float | None = None) -> None:
        """After the update of ``step`` (held: the guard skipped or clipped it). Takes a snapshot on
        every ``every``-th step when none of the last ``every`` steps was held or rose :data:`RISE` x
        the median of the recent ones."""
        self.attempted += 1
        if self.ring is not None and not held and global_norm is not None and math.isfinite(global_norm):
            norms = self._norms
            if len(norms) >= RISE_MIN and global_norm > RISE * statistics.median(norms):
                held = True  # kept out of the history, as the spike guard keeps its spikes out
            else:
                norms.append(global_norm)
        if held:
            self._held_at, self.held_step = self.attempted, step
        if self._restored:  # the step a rollback replaced: the state is the snapshot's already
            self._restored = False
            return
        ring = self.ring
        if ring is None or step % ring.config.every:
            return
        if self._held_at is not None and self.attempted - self._held_at < ring.config.every:
            return
        ring.take(step)

    # -- batches ---------------------------------------------------------------------------

    def should_skip(self) -> bool:
        """Call once per batch, before training on it: True while a rollback's skip_batches last."""
        self.batches += 1
        if self.skip_remaining > 0:
            self.skip_remaining -= 1
            return True
        return False

    def skipping(self, batches: Iterable[T]) -> Iterator[T]:
        """``for batch in agent.skipping(loader):`` — the loader's batches, less those a rollback skips."""
        for batch in batches:
            if not self.should_skip():
                yield batch

    # -- the command -------------------------------------------------------------------------

    def apply(self, spec: Rollback, step: int) -> tuple[str, int]:
        """Before the update of ``step``: restore, or raise Refused. Returns (detail, restored step).
        Collective under torch.distributed: every rank calls it at the same step."""
        if self.ring is None and not self.callbacks:
            raise Refused("no snapshots (watch(..., snapshots=...)) and no on_rollback callback")
        while self._done and self.attempted - self._done[0] >= self.window:
            self._done.popleft()
        if len(self._done) >= self.max_rollbacks:
            raise Refused(f"rollback budget spent: {len(self._done)} rollbacks within the last {self.window} steps "
                          f"(max {self.max_rollbacks})")
        before = spec.before_step if spec.before_step is not None else self.held_step
        before = min(before, step) if before is not None else step
        if self.ring is not None:
            snapshot = self.ring.newest(before, self.floor)
            target = snapshot.step if snapshot is not None else -1
            self._agree(target)
            if snapshot is None:
                raise Refused(f"no snapshot before step {before} and not before the previous rollback's target "
                              f"{self.floor} (snapshots held: {self.ring.steps or 'none'})")
            self.ring.restore(snapshot)
            source = "snapshot"
        else:
            target = self._from_callbacks(before - 1)
            self._agree(target)
            source = "on_rollback callback"
        self.floor = target
        self._done.append(self.attempted)
        self._restored = True
        self.set_step(target)
        if spec.lr_scale != 1.0:
            self.remedy.lr_scale = max(self.remedy.lr_scale * spec.lr_scale, self.remedy.bounds.min_lr_scale)
        detail = f"restored step {target} ({source}; asked for the newest before step {before})"
        if spec.skip_batches:
            first = self.batches
            self.skip_remaining = spec.skip_batches
            self.skipped.append((first, first + spec.skip_batches - 1))
            detail += f"; skipping batches {first}-{first + spec.skip_batches - 1} (should_skip() calls, from 0)"
        detail += f"; learning-rate scale {self.remedy.lr_scale:g}"
        return detail, target

    def _from_callbacks(self, at_most: int) -> int:
        loaded = None
        for fn in self.callbacks:
            result = fn(at_most)
            if result is not None:
                loaded = int(result)
        if loaded is None:
            raise Refused("the on_rollback callback returned no step")
        if loaded > at_most:
            log.warning("gradwatch: the on_rollback callback loaded step %d, asked for at most %d", loaded, at_most)
        return loaded

    def _agree(self, target: int) -> None:
        """Every rank must go back to the same step (a collective when distributed)."""
        if not self.ranks.distributed:
            return
        both = torch.tensor([float(target), -float(target)])
        both = distributed.any_rank(both)
        if both[0].item() != -both[1].item():
            raise Refused(f"the ranks disagree on the state to restore (this rank: step {target})")

    # -- resume ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"attempted": self.attempted, "done": list(self._done), "floor": self.floor,
                "skip_remaining": self.skip_remaining, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.attempted = int(state["attempted"])
        self._done = deque(state["done"])
        self.floor = int(state["floor"])
        self.skip_remaining = int(state["skip_remaining"])
        self.batches = int(state["batches"])


def agent_state(monitor, remedy: Remediation) -> dict[str, Any]:
    """The agent's part of a snapshot: the step, the spike guard's and the healthy norms' history.
    The remediation in force (LR scale, clipping) is not part of it: it stays after a rollback."""
    return {
        "step": monitor.step,
        "spikes": monitor.spikes.state_dict() if monitor.spikes is not None else None,
        "history": {k: list(v) for k, v in remedy.history.items()},
    }


def load_agent_state(monitor, remedy: Remediation, state: dict[str, Any]) -> None:
    monitor.step = state["step"]
    if monitor.spikes is not None and state["spikes"] is not None:
        monitor.spikes.load_state_dict(state["spikes"])
    for key, values in state["history"].items():
        remedy.history[key].clear()
        remedy.history[key].extend(values)
