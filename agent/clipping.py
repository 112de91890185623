"""Gradient clipping and normalisation modes: pure, in-place tensor math, no host sync.

Each function takes the gradients present at this step, their L2 norms (float32,
on device, from the probe) and, for the DL4J per-layer modes, each tensor's unit
index: DL4J's "layer" is a module (its weight and bias together), its "param type"
is one tensor. Formulas (FIELD_NOTES §3):

- ``global_norm``: g ← g · c / max(‖g‖, c) over all gradients (tf.clip_by_global_norm);
- ``clip_l2_per_layer`` / ``clip_l2_per_param_type``: if ‖g_unit‖ > t then g ← t · g / ‖g_unit‖;
- ``clip_value``: g ← clamp(g, −t, t);
- ``renorm_l2_per_layer`` / ``renorm_l2_per_param_type``: g ← g / ‖g_unit‖, always;
- ``adaptive`` (ZClip): EMA mean μ and variance σ² of the global norm (α 0.97);
  z = (‖g‖ − μ)/σ; above z_t the norm is clipped to μ + z_t²/z · σ; the EMA is
  updated with the clipped norm.

Non-finite steps never get here: the guard skips them first (clipping an infinite
norm turns every gradient into NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _scale_(grads: list[Tensor], coef: Tensor) -> None:
    torch._foreach_mul_(grads, [c.to(g.dtype) for c, g in zip(coef.to(grads[0].device).unbind(), grads)])


def _unit_norms(norms: Tensor, units: Tensor) -> Tensor:
    n_units = int(units.max()) + 1 if len(units) else 0
    squares = torch.zeros(n_units, dtype=norms.dtype, device=norms.device).index_add_(0, units, norms.square())
    return squares.sqrt()


@torch.no_grad()
def global_norm_(grads: list[Tensor], norms: Tensor, threshold: float) -> Tensor:
    """Returns the clipped gradients' norms (``norms`` scaled alike), for clipping that follows."""
    total = norms.square().sum().sqrt()
    c = torch.tensor(threshold, dtype=total.dtype, device=total.device)
    coef = c / torch.maximum(total, c)
    torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return norms * coef


@torch.no_grad()
def clip_l2_per_unit_(grads: list[Tensor], norms: Tensor, units: Tensor, threshold: float) -> None:
    unit = _unit_norms(norms, units)
    t = torch.tensor(threshold, dtype=unit.dtype, device=unit.device)
    _scale_(grads, (t / torch.maximum(unit, t))[units])


@torch.no_grad()
def renorm_l2_per_unit_(grads: list[Tensor], norms: Tensor, units: Tensor) -> None:
    unit = _unit_norms(norms, units)
    # A unit whose gradient is exactly zero stays zero instead of becoming NaN.
    coef = torch.where(unit > 0, 1.0 / unit.clamp_min(torch.finfo(unit.dtype).tiny), torch.ones_like(unit))
    _scale_(grads, coef[units])


@torch.no_grad()
def clip_value_(grads: list[Tensor], threshold: float) -> None:
    torch._foreach_clamp_min_(grads, -threshold)
    torch._foreach_clamp_max_(grads, threshold)


class ZClip:
    """Adaptive global-norm clipping (ZClip); state lives on the gradients' device.

    Seeded from the agent's recent healthy norms when there are enough, so it acts
    at once when a command enables it mid-run; otherwise it warms up for ``warmup``
    steps without clipping.
    """

    def __init__(self, z: float = 2.5, alpha: float = 0.97, warmup: int = 25, history: list[float] | None = None):
        self.z = z
        self.alpha = alpha
        self.warmup = warmup
        self._warm: list[Tensor] = []
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        if history and len(history) >= warmup:
            h = torch.tensor(history[-warmup * 4 :], dtype=torch.float32)
            self.mean, self.var = h.mean(), h.var(unbiased=False)

    def threshold(self) -> Tensor | None:
        """The norm above which the next step is clipped (device tensor), None while warming up."""
        if self.mean is None:
            return None
        return self.mean + self.z * self.var.sqrt()

    @torch.no_grad()
    def __call__(self, grads: list[Tensor], norms: Tensor) -> None:
        total = norms.square().sum().sqrt()
        if self.mean is None:
            self._warm.append(total)
            if len(self._warm) >= self.warmup:
                h = torch.stack(self._warm)
                self.mean, self.var = h.mean(), h.var(unbiased=False)
                self._warm = []
            return
        self.mean, self.var = self.mean.to(total.device), self.var.to(total.device)
        std = self.var.sqrt()
        z = (total - self.mean) / std.clamp_min(1e-12)
        clipped = torch.where(z > self.z, self.mean + (self.z * self.z / z) * std, total)
        coef = torch.where(total > 0, clipped / total.clamp_min(1e-30), torch.ones_like(total))
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        self.mean = self.alpha * self.mean + (1 - self.alpha) * clipped
        self.var = self.alpha * self.var + (1 - self.alpha) * (clipped - self.mean) ** 2

    def state_dict(self) -> dict:
        return {
            "z": self.z,
            "alpha": self.alpha,
            "warmup": self.warmup,
            "mean": None if self.mean is None else float(self.mean),
            "var": None if self.var is None else float(self.var),
        }

    @classmethod
    def from_state(cls, state: dict) -> "ZClip":
        clip = cls(state["z"], state["alpha"], state["warmup"])
        if state["mean"] is not None:
            clip.mean, clip.var = torch.tensor(state["mean"]), torch.tensor(state["var"])
        return clip
