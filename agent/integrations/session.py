"""What both framework adapters share: one agent attached late, its state carried through the
framework's checkpoints, and the agent's stop/checkpoint/skip requests turned into flags the
framework's own hooks act on at a point where acting is safe.

No framework is imported here.
"""

from __future__ import annotations

import logging

import torch
from gradwatch.agent.agent import Agent, watch

log = logging.getLogger("gradwatch.agent")


class AgentSession:
    """The agent an adapter attaches, and the requests it has made since the framework last looked.

    ``stop`` and ``checkpoint`` commands arrive inside ``optimizer.step()`` (the agent's post-hook);
    the adapter reads them at the end of the framework's step (:meth:`take`), where stopping or
    saving leaves the framework's loop counters consistent.
    """

    def __init__(self, run: str, settings: dict) -> None:
        self.run = run
        self.settings = settings
        self.agent: Agent | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict | None = None
        self._requests: set[str] = set()

    def attach(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, framework_clip: float | None, scaler=None
    ) -> Agent:
        """Watch ``optimizer`` (the framework's, unwrapped). ``framework_clip``: the framework's own
        global-norm clipping, handed over to gradwatch (which then clips after measuring the raw norms).
        ``scaler``: the framework's fp16 GradScaler, if any (its skips and loss scale are exported)."""
        settings = dict(self.settings)
        explicit = settings.get("max_grad_norm")
        if framework_clip is not None:
            if explicit is not None and explicit != framework_clip:
                raise ValueError(
                    f"gradwatch: max_grad_norm={explicit:g} given to the callback, but the trainer clips at "
                    f"{framework_clip:g}; set one of them (gradwatch takes over the trainer's clipping)"
                )
            settings["max_grad_norm"] = framework_clip
        self.agent = watch(model, optimizer, run=self.run, scaler=settings.pop("scaler", scaler), **settings)
        self.optimizer = optimizer
        self.agent.on_stop(lambda step: self._requests.add("stop"))
        self.agent.on_checkpoint(lambda step: self._requests.add("checkpoint"))
        if self._pending_state is not None:
            self.agent.load_state_dict(self._pending_state)
            self._pending_state = None
        return self.agent

    def take(self, request: str) -> bool:
        """True once after the agent asked for ``request`` ("stop" or "checkpoint")."""
        if request in self._requests:
            self._requests.discard(request)
            return True
        return False

    def should_skip(self) -> bool:
        """Whether the agent asks to leave out the batch about to run (rollback's skipped batches).
        False for an agent without that feature."""
        ask = getattr(self.agent, "should_skip", None)
        return bool(ask()) if ask is not None else False

    def drop_step(self) -> None:
        """Make the coming optimizer step a no-op: with no gradients, the optimizer leaves parameters
        and its state untouched (as the guard's own skip does)."""
        if self.optimizer is None:
            return
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def state_dict(self) -> dict | None:
        if self.agent is not None:
            return self.agent.state_dict()
        return self._pending_state

    def load_state_dict(self, state: dict | None) -> None:
        """Restore into the attached agent, or keep it for the agent still to be attached."""
        if state is None:
            return
        if self.agent is not None:
            self.agent.load_state_dict(state)
        else:
            self._pending_state = state

    def close(self) -> None:
        """Detach; the agent's state is kept so a later attach (another fit/train call) carries on."""
        if self.agent is None:
            return
        self._pending_state = self.agent.state_dict()
        self.agent.close()
        self.agent = None
        self.optimizer = None
        self._requests.clear()
