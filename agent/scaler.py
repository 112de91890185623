"""GradScaler's own skips and its loss scale.

A GradScaler that finds Inf/NaN in the scaled gradients never calls ``optimizer.step()``, so the
optimizer's hooks never see that step. Given the scaler (``watch(..., scaler=scaler)``), the agent
wraps this instance's ``step`` (not the class): a call that returns without the optimizer having
stepped is a skip, counted as ``gradwatch_skipped_steps_total{reason="amp_overflow"}``, and the
step still counts in ``gradwatch_step``. The scale itself (a device tensor) rides along with the
step's one host transfer: ``gradwatch_loss_scale`` is the scale that step's backward used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class ScalerWatch:
    def __init__(self, scaler: object, entered: Callable[[], int], skipped: Callable[[], None]) -> None:
        """``entered``: how many times the watched optimizer's step() has run; ``skipped``: called per skip."""
        if not isinstance(scaler, torch.amp.GradScaler):
            raise ValueError(f"gradwatch.watch: scaler must be a torch.amp.GradScaler; got {type(scaler).__name__}")
        if "step" in vars(scaler):
            raise ValueError("gradwatch.watch: this GradScaler is already watched; close() the other agent first")
        self.scaler = scaler
        self._entered = entered
        self._skipped = skipped
        original = scaler.step

        def step(optimizer, *args, **kwargs):
            before = entered()
            out = original(optimizer, *args, **kwargs)
            if entered() == before and scaler.is_enabled():
                skipped()
            return out

        self._step = step
        scaler.step = step  # on this instance only; close() removes it

    def scale(self) -> Tensor | None:
        """The current loss scale as a device tensor (no sync), None while the scaler is off or unused."""
        value = getattr(self.scaler, "_scale", None)
        return value if isinstance(value, Tensor) and self.scaler.is_enabled() else None

    def close(self) -> None:
        if vars(self.scaler).get("step") is self._step:
            del self.scaler.step
