"""gradwatch for PyTorch Lightning: one callback.

    trainer = lightning.Trainer(callbacks=[GradwatchCallback(run="my-run")], gradient_clip_val=1.0)

The callback attaches the agent once Lightning has built the optimizer (``on_fit_start``), so
``configure_optimizers`` needs no change; the LightningModule needs none either. Under automatic
optimization the forward and backward run inside ``optimizer.step(closure)``; the agent wraps the
closure, so it measures and guards the gradients the step applies.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from gradwatch.agent.agent import Agent
from gradwatch.agent.integrations.session import AgentSession

log = logging.getLogger("gradwatch.agent")


class GradwatchCallback(Callback):
    """Attach gradwatch to a Lightning fit.

    ``settings`` are ``watch()`` settings (``every``, ``port``, ``watchdog_url``, ``max_grad_norm`` ...).
    ``gradient_clip_val`` with the default "norm" algorithm is handed over to gradwatch: Lightning stops
    clipping and gradwatch clips to the same bound after measuring the raw norms, so exported norms are
    the pre-clip ones (``utilities.grad_norm`` in ``on_before_optimizer_step`` reads the same values).
    Under manual optimization pass ``max_grad_norm`` here instead of calling ``clip_gradients``.
    """

    def __init__(self, run: str, **settings: Any) -> None:
        self.session = AgentSession(run, settings)
        self._clip: tuple[Any, Any] | None = None  # the trainer's clipping, given back at teardown
        self._drop = False

    @property
    def agent(self) -> Agent | None:
        """The attached agent (None before ``fit`` has built the optimizer and after it ends)."""
        return self.session.agent

    @property
    def state_key(self) -> str:
        return self._generate_state_key(run=self.session.run)

    # -- attach and detach -----------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After Lightning's strategy has built the optimizers: attach to the first one."""
        self.teardown(trainer, pl_module, "fit")  # still attached after an earlier fit that did not end cleanly
        optimizers = trainer.optimizers
        if not optimizers:
            log.warning("gradwatch: the LightningModule configured no optimizer; nothing to watch")
            return
        if len(optimizers) > 1:
            log.warning("gradwatch: %d optimizers configured; watching the first only", len(optimizers))
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # "16-mixed": Lightning's GradScaler
        self.session.attach(pl_module, optimizers[0], self._take_over_clipping(trainer), scaler=scaler)

    def _take_over_clipping(self, trainer: pl.Trainer) -> float | None:
        value, algorithm = trainer.gradient_clip_val, trainer.gradient_clip_algorithm
        if not value or algorithm not in (None, "norm"):  # None: Lightning's default, the norm
            if value:  # clipping by value stays Lightning's: exported norms are then post-clip
                log.warning("gradwatch: gradient_clip_algorithm=%r stays with Lightning; exported norms are post-clip", algorithm)
            return None
        self._clip = (trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
        trainer.gradient_clip_val = None
        return float(value)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.session.close()
        if self._clip is not None:
            trainer.gradient_clip_val, trainer.gradient_clip_algorithm = self._clip
            self._clip = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    # -- every batch -----------------------------------------------------------------------

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """A batch the agent asks to skip drops the optimizer step it belongs to."""
        if self.session.should_skip():
            self._drop = True

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        """Each micro-batch's loss; the agent exports their mean per optimizer step. Under automatic
        optimization Lightning has divided it by ``accumulate_grad_batches`` for the backward: undone here,
        so the value is what ``training_step`` returned."""
        agent = self.session.agent
        if agent is None:
            return
        if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
            loss = loss.detach() * trainer.accumulate_grad_batches
        agent.observe(loss=loss)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self._drop and optimizer is self.session.optimizer:
            self._drop = False
            self.session.drop_step()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        """The agent's requests, acted on between batches, where Lightning's loop state is consistent."""
        if self.session.take("checkpoint"):
            trainer.save_checkpoint(self._checkpoint_path(trainer))
        if self.session.take("stop"):
            log.warning("gradwatch: stop requested by the watchdog; ending the fit after this batch")
            trainer.should_stop = True

    @staticmethod
    def _checkpoint_path(trainer: pl.Trainer) -> str:
        checkpoint = trainer.checkpoint_callback
        folder = getattr(checkpoint, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(folder, f"gradwatch-step={trainer.global_step}.ckpt")

    # -- saved with Lightning's checkpoints ------------------------------------------------

    def state_dict(self) -> dict:
        return {"agent": self.session.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.session.load_state_dict(state_dict.get("agent"))
