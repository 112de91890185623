"""gradwatch for the Hugging Face ``transformers.Trainer``: one callback.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[GradwatchTrainerCallback(run="my-run")])

The Trainer builds (and accelerate wraps) its optimizer inside ``train()``; the callback attaches the
agent at ``on_train_begin`` to the optimizer inside accelerate's ``AcceleratedOptimizer``, so no
``create_optimizer()`` call or ``compute_loss`` override is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from gradwatch.agent.agent import Agent
from gradwatch.agent.integrations.session import AgentSession

log = logging.getLogger("gradwatch.agent")


def _inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


class GradwatchTrainerCallback(TrainerCallback, ExportableState):
    """Attach gradwatch to ``Trainer.train()``.

    ``settings`` are ``watch()`` settings (``every``, ``port``, ``watchdog_url``, ...).

    - ``max_grad_norm`` (the Trainer's, 1.0 by default) is handed over to gradwatch: the Trainer then only
      measures the norm it logs (its ``clip_grad_norm_(..., inf)``) and gradwatch clips after measuring,
      so ``gradwatch_grad_global_norm`` equals the Trainer's logged ``grad_norm`` (pre-clip).
    - The loss exported per optimizer step is the Trainer's logged per-step loss: the model's loss of each
      micro-batch, averaged over the step (or, when the Trainer normalises by the step's token count,
      their sum), never divided by ``gradient_accumulation_steps``.
    - The LR the Trainer logs (``get_last_lr()``) is the LR the step applied, the watchdog's LR scale included.
    - The agent's state rides in ``trainer_state.json`` of every checkpoint and is restored on resume.
    """

    def __init__(self, run: str, **settings: Any) -> None:
        self.session = AgentSession(run, settings)
        self._handover: tuple[Any, float] | None = None  # (args, the Trainer's max_grad_norm), handed over per step
        self._hook = None
        self._scheduler = None  # the Trainer's LR scheduler, whose logged LR is made the applied one
        self._losses: list[torch.Tensor] = []
        self._summed = False  # the step's micro-batch losses are shares of one token-normalised loss
        self._drop = False
        self._world = 1

    @property
    def agent(self) -> Agent | None:
        """The attached agent (None outside ``train()``)."""
        return self.session.agent

    # -- saved in trainer_state.json -------------------------------------------------------

    def state(self) -> dict:
        settings = {k: v for k, v in self.session.settings.items() if k != "scaler"}  # an object, not JSON
        return {"args": {"run": self.session.run, **settings}, "attributes": {"agent_state": self.session.state_dict()}}

    @property
    def agent_state(self) -> dict | None:
        return self.session.state_dict()

    @agent_state.setter
    def agent_state(self, state: dict | None) -> None:  # set by the Trainer restoring callback states
        self.session.load_state_dict(state)

    def _saved_state(self, state) -> dict | None:
        """This callback's agent state in the checkpoint being resumed (None on a fresh start)."""
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        for entry in saved if isinstance(saved, list) else [saved]:
            if isinstance(entry, Mapping) and entry.get("args", {}).get("run") == self.session.run:
                return entry.get("attributes", {}).get("agent_state")
        return None

    # -- attach and detach -----------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if optimizer is None or model is None:
            log.warning("gradwatch: the Trainer passed no model/optimizer to on_train_begin; nothing watched")
            return
        self.close()  # still attached after a train() that raised
        self.session.load_state_dict(self._saved_state(state))
        clip = float(args.max_grad_norm) if args.max_grad_norm and args.max_grad_norm > 0 else None
        self.session.attach(model, _inner_optimizer(optimizer), clip, scaler=getattr(optimizer, "scaler", None))
        if clip is not None:
            self._handover = (args, args.max_grad_norm)
        self._world = args.world_size if args.average_tokens_across_devices else 1
        self._hook = model.register_forward_hook(self._record_loss, with_kwargs=True)
        self._scheduler = lr_scheduler

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Detach and give the Trainer back its clipping and scheduler (also called at ``on_train_end``)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._scheduler = None
        if self._handover is not None:
            args, value = self._handover
            args.max_grad_norm = value
            self._handover = None
        self.session.close()

    # -- every micro-batch and step --------------------------------------------------------

    def _record_loss(self, module, args, kwargs, output) -> None:
        """The model's loss of a training micro-batch (evaluation forwards are left out)."""
        if not (module.training and torch.is_grad_enabled()) or self.session.agent is None:
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach())
            # With num_items_in_batch the model divides by the whole step's token count: the
            # micro-batch losses are shares of the step's loss, which the Trainer logs as their sum.
            self._summed = kwargs.get("num_items_in_batch") is not None

    def on_step_begin(self, args, state, control, **kwargs):
        """Before the first micro-batch of an optimizer step. The Trainer's clipping is off from here to
        the end of the step (it then only measures the norm it logs, with ``clip_grad_norm_(..., inf)``),
        and on again at ``on_step_end``, so the arguments it saves with a checkpoint are the user's."""
        if self._handover is not None:
            self._handover[0].max_grad_norm = 0.0
        self._losses = []
        self._check_skip()

    def on_substep_end(self, args, state, control, **kwargs):
        """After a micro-batch that does not end the step: the next micro-batch is about to run."""
        self._check_skip()

    def _check_skip(self) -> None:
        if self.session.should_skip():
            self._drop = True

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        agent = self.session.agent
        if agent is None:
            return
        if self._losses:
            total = torch.stack(self._losses).float().sum()
            agent.observe(loss=total * self._world if self._summed else total / len(self._losses))
            self._losses = []
        if self._drop:
            self._drop = False
            self.session.drop_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        """Right after ``optimizer.step()``, just before the Trainer reads the LR it logs from the
        scheduler's ``get_last_lr()``. The agent scales the LR inside the step only (the scheduler keeps
        owning ``group["lr"]``), so the scheduler's value is not what the step applied after an LR cut:
        its last LR is set to the applied one here, and its next ``step()`` replaces it as usual
        (torch's schedulers only write ``_last_lr``, never read it to compute the next LR)."""
        agent, scheduler = self.session.agent, self._scheduler
        if agent is None or agent.remedy.lr_scale == 1.0 or not hasattr(scheduler, "_last_lr"):
            return
        scheduler._last_lr = [agent.remedy.effective_lr(float(g["lr"])) for g in self.session.optimizer.param_groups]

    def on_step_end(self, args, state, control, **kwargs):
        """The agent's requests, turned into the Trainer's own controls (acted on right after this hook)."""
        if self._handover is not None:
            args, value = self._handover
            args.max_grad_norm = value
        if self.session.take("checkpoint"):
            control.should_save = True
        if self.session.take("stop"):
            log.warning("gradwatch: stop requested by the watchdog; the Trainer ends after this step")
            control.should_training_stop = True
        return control
