"""What the demo keeps of each training step, for the picture and ``trace.json``.

The protected run is read from the agent's own telemetry (what its /metrics endpoint
would show after that step); the unprotected run, which has no agent, records its loss
and the global gradient norm it computed itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gradwatch.agent.telemetry import Telemetry


def _num(value) -> float:
    return float(value) if value is not None else math.nan


@dataclass
class Trace:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    layer_norms: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Per layer, (step, gradient L2 norm) on the agent's sampled steps."""
    update_ratio: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Per layer, (step, log10 mean|dw| / mean|w|) on the agent's detail steps."""
    guard: list[tuple[int, str]] = field(default_factory=list)
    """(step, what) where the agent's guard acted: ``spike clipped`` or ``NaN/Inf step skipped``."""
    final_loss: float = math.nan
    """Held-out loss at the end."""

    def nonfinite_steps(self) -> list[int]:
        """Steps whose loss was NaN or Inf."""
        return [s for s, v in zip(self.steps, self.loss) if not math.isfinite(v)]

    def save(self, path: Path) -> None:
        # JSON has no NaN/Inf: write them as null so any JSON reader can load the file.
        def clean(value):
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [clean(v) for v in value]
            return value

        path.write_text(json.dumps(clean(asdict(self))))


class AgentRecorder:
    """Reads the agent's telemetry after every step into a :class:`Trace`."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.trace = Trace()
        self._last_layers: Mapping = {}
        self._last_ratio: dict = {}
        self._guarded = (0, 0)

    def record(self, step: int) -> None:
        view = self.telemetry.read()
        t = self.trace
        t.steps.append(step)
        t.loss.append(_num(view.loss))
        t.grad_norm.append(_num(view.grad_global_norm))
        t.lr.append(view.learning_rates[0] if view.learning_rates else math.nan)  # as applied: LR scale included
        guarded = (sum(view.spike_clipped.values()), view.skipped["nonfinite"] + view.skipped["nonfinite_peer"])
        if guarded[0] > self._guarded[0]:
            t.guard.append((step, "spike clipped"))
        if guarded[1] > self._guarded[1]:
            t.guard.append((step, "NaN/Inf step skipped"))
        self._guarded = guarded
        if view.layers is not self._last_layers:  # a new sampled step's table
            self._last_layers = view.layers
            for layer, values in view.layers.items():
                t.layer_norms.setdefault(layer, []).append((step, values.grad_norm))
        if view.update_ratio != self._last_ratio:
            self._last_ratio = view.update_ratio
            for layer, ratio in view.update_ratio.items():
                t.update_ratio.setdefault(layer, []).append((step, math.log10(ratio) if ratio > 0 else math.nan))


def record_plain(trace: Trace, step: int, loss: torch.Tensor, model: torch.nn.Module, lr: float) -> None:
    """The unprotected run's step: its loss and global gradient norm, computed here."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.tensor(math.nan)
    trace.steps.append(step)
    trace.loss.append(float(loss))
    trace.grad_norm.append(float(norm))
    trace.lr.append(lr)
