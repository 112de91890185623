"""Remediation state inside the trainer: the learning-rate scale and the clipping mode.

Commands are applied here, between two optimizer steps, on the training thread;
the same bounds hold whatever the watchdog asks (a cap on LR cuts per window, a
cooldown between cuts, a floor on the scale), so a runaway rule cannot drive the
learning rate to zero. ``apply_lr``/``restore_lr`` wrap each optimizer step: the
scheduler keeps owning ``group["lr"]`` and the scale multiplies whatever it set.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

from gradwatch.agent import clipping, spikes
from gradwatch.watchdog.schema import Action, DisableClipping, EnableClipping, LowerLR, RestoreLR

AUTO_FACTOR = 2.0
"""`threshold: auto` = this x the median of the recent accepted global norms (icefall's
ScaledAdam clips at 2x the median of recent norms): a healthy step rarely exceeds twice
the median norm, an exploding one does by orders of magnitude."""
AUTO_MIN_STEPS = spikes.MIN_HISTORY
"""Accepted steps an `auto` threshold needs (the guard's own warm-up: ~20 steps)."""
HISTORY = spikes.WINDOW
"""Accepted steps kept for `auto` thresholds and ZClip seeding (one per optimizer step)."""
SHAPES = 50
"""Sampled steps kept for the per-layer and per-value shape of the gradients."""

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
        self._restarted = False  # the global history restarted from an accepted regime
        # The guard's accepted steps only (spikes.py): never a held spike, a step the guard
        # clipped, or a non-finite value. "global": the global norm of every accepted step;
        # "layer_share"/"abs_share": on accepted sampled steps, the largest layer norm and the largest |g|
        # as ratios to that step's global norm (scale-free, so they survive a change of regime).
        self.history = {
            "global": deque(maxlen=HISTORY), "layer_share": deque(maxlen=SHAPES), "abs_share": deque(maxlen=SHAPES)
        }
        self._grad_dtype = torch.float32  # the narrowest floating dtype of the watched parameters
        self._wide = torch.float64  # the dtype the clipping arithmetic runs in

    # -- healthy history ----------------------------------------------------------------

    def watch_dtypes(self, dtypes: set[torch.dtype], device: torch.device) -> None:
        """The watched parameters' dtypes and device: what a clipping threshold must fit."""
        floats = [d for d in dtypes if d.is_floating_point]
        if floats:
            self._grad_dtype = min(floats, key=lambda d: torch.finfo(d).max)
        self._wide = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64

    def observe_healthy(self, global_norm: float, max_layer_norm: float | None, max_abs: float | None) -> None:
        """One step the guard accepted (the per-layer values on sampled steps only)."""
        self.history["global"].append(global_norm)
        if global_norm > 0 and max_layer_norm is not None:
            self.history["layer_share"].append(max_layer_norm / global_norm)
        if global_norm > 0 and max_abs is not None:
            self.history["abs_share"].append(max_abs / global_norm)

    def new_regime(self, norms: list[float]) -> None:
        """The guard accepted a new norm regime: its norms replace the global history."""
        self.history["global"].clear()
        self.history["global"].extend(norms)
        self._restarted = True

    def _auto_threshold(self, mode: str) -> float:
        norms = [v for v in self.history["global"] if v > 0]
        need = 1 if self._restarted else AUTO_MIN_STEPS
        if len(norms) < need:
            raise Refused(f"threshold 'auto' needs {need} accepted steps of gradient-norm history; have {len(norms)}")
        threshold = AUTO_FACTOR * statistics.median(norms)
        if mode == "global_norm":
            return threshold
        shape = self.history["abs_share" if mode == "clip_value" else "layer_share"]
        if not shape:
            raise Refused(f"threshold 'auto' for {mode} needs a sampled step's per-layer statistics; none yet")
        return threshold * statistics.median(shape)

    def _check_threshold(self, mode: str, threshold: float) -> None:
        """Refuse a threshold the gradients' dtype or the clipping arithmetic cannot hold."""
        if not (threshold > 0 and math.isfinite(threshold)):
            raise Refused(f"clipping threshold {threshold!r} is not a positive finite number")
        if mode == "clip_value":
            largest = torch.finfo(self._grad_dtype).max
            if threshold > largest:
                raise Refused(f"clip_value threshold {threshold:g} exceeds the largest {self._grad_dtype} value "
                              f"({largest:g}): the gradients cannot hold it")
        else:
            largest = math.sqrt(torch.finfo(self._wide).max)
            if threshold > largest:
                raise Refused(f"{mode} threshold {threshold:g}: its square overflows the {self._wide} clipping "
                              f"arithmetic (largest usable {largest:.3g})")

    # -- commands -----------------------------------------------------------------------

    def apply(self, spec: Action) -> str:
        """Apply one command's action; returns a short description, raises Refused."""
        if isinstance(spec, LowerLR):
            return self._lower_lr(spec)
        if isinstance(spec, RestoreLR):
            self.lr_scale = 1.0 if spec.factor is None else min(1.0, self.lr_scale * spec.factor)
            if self.lr_scale == 1.0:
                self.min_lr = None
            return f"learning-rate scale restored to {self.lr_scale:g}"
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
            self._check_threshold(spec.mode, threshold)
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
        # Squares and sums of the norms in float64 where the device has it: in float32 the square of
        # a norm above 1.8e19 overflows, the total turns Inf and a clip would zero every gradient.
        norms = norms.to(self._wide)
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
            "restarted": self._restarted,
        }

    def load_state_dict(self, state: dict) -> None:
        self.lr_scale = float(state["lr_scale"])
        self.min_lr = state["min_lr"]
        self.clip_mode = state["clip_mode"]
        self.clip_threshold = state["clip_threshold"]
        self.zclip = None if state["zclip"] is None else clipping.ZClip.from_state(state["zclip"])
        for key, values in state["history"].items():
            if key in self.history:  # older states kept absolute per-layer values: not comparable, dropped
                self.history[key].extend(values)
        self._restarted = bool(state.get("restarted", False))
