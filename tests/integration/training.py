"""Real training runs with the agent attached, for tests that watch them from outside.

The task is the adding problem (Hochreiter & Schmidhuber 1997): a sequence of
(value, marker) pairs, the target is the sum of the two marked values. An LSTM
trained by SGD with momentum at lr 0.05 learns it stably. :meth:`Run.explode`
raises the learning rate to 2.0, past SGD's stability limit: the update overshoots
more every step, the gradient norm grows geometrically (x2-100 per step, depending
on where training was), and within 20-100 steps the loss is +Inf and the gradients
NaN — a real divergence, nothing injected into the metrics.
"""

from __future__ import annotations

import math
import threading
import time

import torch
from torch import nn

import gradwatch.agent

HEALTHY_LR = 0.05
EXPLODING_LR = 2.0


class AddingLSTM(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = nn.LSTM(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)


def adding_batch(gen: torch.Generator, batch: int = 32, length: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.rand(batch, length, generator=gen)
    marks = torch.zeros(batch, length)
    picks = torch.stack([torch.randperm(length, generator=gen)[:2] for _ in range(batch)])
    marks.scatter_(1, picks, 1.0)
    return torch.stack([values, marks], -1), (values * marks).sum(1)


class Run:
    """One training run (model, optimizer, data) with the agent's /metrics on an ephemeral loopback port."""

    def __init__(self, name: str, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.name = name
        self.model = AddingLSTM()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=HEALTHY_LR, momentum=0.9)
        # The guard's spike clipping is off here: these runs must really diverge to NaN, to show
        # the watchdog alerting on it (tests/integration/test_remediation_e2e.py covers the spike guard).
        self.agent = gradwatch.agent.watch(self.model, self.optimizer, run=name, port=0, every=1, spike_sigma=None)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.exploded_at: float | None = None  # wall time of the first step at the exploding LR

    def explode(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = EXPLODING_LR

    def step(self) -> torch.Tensor:
        """One optimizer step; returns the loss (still a tensor: reading it is a sync the caller may skip)."""
        if self.exploded_at is None and self.optimizer.param_groups[0]["lr"] == EXPLODING_LR:
            self.exploded_at = time.time()
        x, y = adding_batch(self.gen)
        self.optimizer.zero_grad()
        loss = nn.functional.mse_loss(self.model(x), y)
        loss.backward()
        self.agent.observe(loss=loss)
        self.optimizer.step()
        return loss

    def close(self) -> None:
        self.agent.close()


class Trainer:
    """Steps runs in one background thread, interleaved and paced, until :meth:`stop`.

    A run that has exploded stops stepping once its loss was non-finite
    ``nonfinite_steps`` times: its endpoint keeps exporting its last (non-finite)
    values, as a stuck trainer's would, without flooding the log with the guard's
    skipped-step warnings.
    """

    def __init__(self, runs: list[Run], pause_s: float = 0.004, nonfinite_steps: int = 10) -> None:
        self.runs = runs
        self.pause_s = pause_s
        self.nonfinite_steps = nonfinite_steps
        self._nonfinite: dict[str, int] = {r.name: 0 for r in runs}
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="test-trainer", daemon=True)

    def start(self) -> Trainer:
        self._thread.start()
        return self

    def _loop(self) -> None:
        torch.set_num_threads(1)
        try:
            while not self._stop.is_set():
                for run in self.runs:
                    if self._nonfinite[run.name] >= self.nonfinite_steps:
                        continue
                    loss = run.step()
                    if run.exploded_at is not None and not math.isfinite(loss.item()):
                        self._nonfinite[run.name] += 1
                self._stop.wait(self.pause_s)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        if self.error is not None:
            raise self.error
