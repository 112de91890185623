"""Remediation state inside the trainer: the learning-rate scale and the clipping mode.

Commands are applied here, between two optimizer steps, on the training thread;
the same bounds hold whatever the watchdog asks (a cap on LR cuts per window, a
cooldown between cuts, a floor on the scale), so a runaway rule cannot drive the
learning rate to zero. ``apply_lr``/``restore_lr`` wrap each optimizer step: the
scheduler keeps owning ``group["lr"]`` and the scale multiplies whatever it set.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

from gradwatch.agent import clipping
from gradwatch.watchdog.schema import Action, DisableClipping, EnableClipping, LowerLR, RestoreLR

AUTO_FACTOR = 2.0
"""`threshold: auto` = this × the median of recent healthy norms: a healthy step rarely
exceeds twice the median norm, an exploding one does by orders of magnitude."""
HISTORY = 200
"""Recent healthy sampled steps kept for `auto` thresholds and ZClip seeding."""


@dataclass(frozen=True)
class Bounds:
    """Agent-side limits on LR cuts (the watchdog has its own)."""

    max_lr_cuts: int = 4
    lr_cut_window_s: float = 600.0
    lr_cut_cooldown_s: float = 10.0
    min_lr_scale: float = 1e-3


class Refused(Exception):
    """A command the agent will not apply; the message goes into the acknowledgement."""


class Remediation:
    def __init__(self, bounds: Bounds, clock=time.monotonic) -> None:
        self.bounds = bounds
        self.clock = clock
        self.lr_scale = 1.0
        self.min_lr: float | None = None
        self.clip_mode: str | None = None
        self.clip_threshold: float | None = None
        self.zclip: clipping.ZClip | None = None
        self._cuts: deque[float] = deque()
        self._saved_lrs: list | None = None
        self.history = {"global": deque(maxlen=HISTORY), "layer": deque(maxlen=HISTORY), "abs": deque(maxlen=HISTORY)}

    # -- healthy history ----------------------------------------------------------------

    def observe_healthy(self, global_norm: float, max_layer_norm: float | None, max_abs: float | None) -> None:
        self.history["global"].append(global_norm)
        if max_layer_norm is not None:
            self.history["layer"].append(max_layer_norm)
        if max_abs is not None:
            self.history["abs"].append(max_abs)

    def _auto_threshold(self, mode: str) -> float:
        key = {"global_norm": "global", "clip_value": "abs"}.get(mode, "layer")
        values = [v for v in self.history[key] if v > 0]
        if len(values) < 5:
            raise Refused(f"threshold 'auto' needs at least 5 healthy sampled steps; have {len(values)}")
        return AUTO_FACTOR * statistics.median(values)

    # -- commands -----------------------------------------------------------------------

    def apply(self, spec: Action) -> str:
        """Apply one command's action; returns a short description, raises Refused."""
        if isinstance(spec, LowerLR):
            return self._lower_lr(spec)
        if isinstance(spec, RestoreLR):
            self.lr_scale, self.min_lr = 1.0, None
            return "learning-rate scale restored to 1"
        if isinstance(spec, EnableClipping):
            return self._enable_clipping(spec)
        if isinstance(spec, DisableClipping):
            self.clip_mode = self.clip_threshold = self.zclip = None
            return "clipping disabled"
        raise Refused(f"unknown action {spec.action!r}")

    def _lower_lr(self, spec: LowerLR) -> str:
        now = self.clock()
        b = self.bounds
        while self._cuts and now - self._cuts[0] > b.lr_cut_window_s:
            self._cuts.popleft()
        if self._cuts and now - self._cuts[-1] < b.lr_cut_cooldown_s:
            raise Refused(f"cooldown: last LR cut {now - self._cuts[-1]:.1f} s ago (< {b.lr_cut_cooldown_s:g} s)")
        if len(self._cuts) >= b.max_lr_cuts:
            raise Refused(f"{len(self._cuts)} LR cuts within {b.lr_cut_window_s:g} s already (max {b.max_lr_cuts})")
        if self.lr_scale <= b.min_lr_scale:
            raise Refused(f"LR scale is at its floor {b.min_lr_scale:g}")
        self.lr_scale = max(self.lr_scale * spec.factor, b.min_lr_scale)
        if spec.min_lr is not None:
            self.min_lr = spec.min_lr if self.min_lr is None else max(self.min_lr, spec.min_lr)
        self._cuts.append(now)
        return f"learning-rate scale now {self.lr_scale:g}"

    def _enable_clipping(self, spec: EnableClipping) -> str:
        if spec.mode == "adaptive":
            self.zclip = clipping.ZClip(z=spec.z, history=list(self.history["global"]))
            self.clip_mode, self.clip_threshold = spec.mode, None
            return f"adaptive clipping (z {spec.z:g})"
        if spec.mode.startswith("renorm"):
            threshold = None
        else:
            threshold = self._auto_threshold(spec.mode) if spec.threshold == "auto" else float(spec.threshold)
        if self.clip_mode == spec.mode and threshold is not None and self.clip_threshold is not None:
            threshold = min(threshold, self.clip_threshold)  # enabling again only ever tightens
        self.clip_mode, self.clip_threshold, self.zclip = spec.mode, threshold, None
        return f"{spec.mode} clipping" + (f" at {threshold:g}" if threshold is not None else "")

    # -- around every optimizer step ----------------------------------------------------

    @property
    def clipping_active(self) -> bool:
        return self.clip_mode is not None

    def clip(self, grads: list[Tensor], norms: Tensor, units: Tensor) -> None:
        mode, t = self.clip_mode, self.clip_threshold
        if mode == "global_norm":
            clipping.global_norm_(grads, norms, t)
        elif mode == "clip_l2_per_layer":
            clipping.clip_l2_per_unit_(grads, norms, units, t)
        elif mode == "clip_l2_per_param_type":
            clipping.clip_l2_per_unit_(grads, norms, torch.arange(len(grads), device=norms.device), t)
        elif mode == "clip_value":
            clipping.clip_value_(grads, t)
        elif mode == "renorm_l2_per_layer":
            clipping.renorm_l2_per_unit_(grads, norms, units)
        elif mode == "renorm_l2_per_param_type":
            clipping.renorm_l2_per_unit_(grads, norms, torch.arange(len(grads), device=norms.device))
        elif mode == "adaptive":
            self.zclip(grads, norms)

    def apply_lr(self, optimizer: torch.optim.Optimizer) -> None:
        """Before the step: scheduled LR × scale (never below min_lr unless the schedule itself is)."""
        if self.lr_scale == 1.0:
            self._saved_lrs = None
            return
        self._saved_lrs = []
        for group in optimizer.param_groups:
            lr = group["lr"]
            effective = self.effective_lr(float(lr))
            if isinstance(lr, Tensor):
                self._saved_lrs.append(lr.clone())
                lr.fill_(effective)
            else:
                self._saved_lrs.append(lr)
                group["lr"] = effective

    def effective_lr(self, scheduled: float) -> float:
        """The LR a step applies when the scheduler set ``scheduled``: × scale, never below min_lr
        unless the schedule itself is (what trainers should log as the LR)."""
        effective = scheduled * self.lr_scale
        if self.min_lr is not None:
            effective = max(effective, min(self.min_lr, scheduled))
        return effective

    def restore_lr(self, optimizer: torch.optim.Optimizer) -> None:
        """After the step: give the scheduler back exactly what it set."""
        if self._saved_lrs is None:
            return
        for group, saved in zip(optimizer.param_groups, self._saved_lrs):
            if isinstance(saved, Tensor):
                group["lr"].copy_(saved)
            else:
                group["lr"] = saved
        self._saved_lrs = None

    # -- resume -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "lr_scale": self.lr_scale,
            "min_lr": self.min_lr,
            "clip_mode": self.clip_mode,
            "clip_threshold": self.clip_threshold,
            "zclip": None if self.zclip is None else self.zclip.state_dict(),
            "history": {k: list(v) for k, v in self.history.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.lr_scale = float(state["lr_scale"])
        self.min_lr = state["min_lr"]
        self.clip_mode = state["clip_mode"]
        self.clip_threshold = state["clip_threshold"]
        self.zclip = None if state["zclip"] is None else clipping.ZClip.from_state(state["zclip"])
        for key, values in state["history"].items():
            self.history[key].extend(values)
