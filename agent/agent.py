"""The object a training script holds: attach with ``watch()``, detach with ``close()``."""

from __future__ import annotations

import logging
import weakref

import torch
from prometheus_client import CollectorRegistry

from gradwatch.agent import distributed
from gradwatch.agent.config import AgentConfig, build_config
from gradwatch.agent.exporter import GradwatchCollector
from gradwatch.agent.layers import LayerMap
from gradwatch.agent.monitor import StepMonitor
from gradwatch.agent.server import MetricsServer
from gradwatch.agent.telemetry import Telemetry

log = logging.getLogger("gradwatch.agent")

_watched: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


def _named_optimizer_params(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list, list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    if not names:
        raise ValueError("gradwatch.watch: the model has no parameters to watch")
    params, labels, seen = [], [], set()
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) in seen:
                continue
            seen.add(id(p))
            params.append(p)
            labels.append(names.get(id(p), f"group{g}.param{i}"))
    if not any(id(p) in names for p in params):
        raise ValueError(
            "gradwatch.watch: the optimizer holds none of the model's parameters; "
            "pass the optimizer built from this model's parameters"
        )
    return params, labels


class Agent:
    """Watches one model/optimizer pair: per-layer telemetry, the step guard and the /metrics endpoint.

    Lifecycle: built by :func:`watch`; every ``optimizer.step()`` then runs the guard and,
    on sampled steps, the probe; :meth:`observe` reports the loss; :meth:`close` removes
    the hooks and stops the endpoint, leaving the optimizer as it was.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: AgentConfig) -> None:
        if optimizer in _watched:
            raise ValueError("gradwatch.watch: this optimizer is already watched; close() the other agent first")
        params, names = _named_optimizer_params(model, optimizer)
        self.config = config
        self.ranks = distributed.rank_info()
        self.layer_map = LayerMap(names, [p.numel() for p in params], config.layers, config.top_k)
        self.telemetry = Telemetry(self.layer_map.depth())
        self.monitor = StepMonitor(params, self.layer_map, self.telemetry, optimizer, config, self.ranks)
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = GradwatchCollector(self.telemetry, config.run, self.ranks.rank)
        self.registry.register(self.collector)
        port = config.port
        if port and self.ranks.distributed:
            port += self.ranks.local_rank
        self._server = MetricsServer(self.registry, self.collector, config.host, port)
        self._optimizer = optimizer
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]
        _watched.add(optimizer)
        log.info("gradwatch: watching run %r (rank %d), metrics at %s", config.run, self.ranks.rank, self.url)

    @property
    def url(self) -> str:
        """The metrics endpoint, e.g. ``http://127.0.0.1:9465/metrics``."""
        return self._server.url

    @property
    def step(self) -> int:
        """Optimizer steps attempted since attach (or restored by load_state_dict)."""
        return self.monitor.step

    def observe(self, loss=None) -> None:
        """Report this step's loss (a tensor stays on its device; no sync here)."""
        if loss is not None:
            self.monitor.observe_loss(loss)

    def _pre_hook(self, optimizer, args, kwargs) -> None:
        try:
            self.monitor.before_step()
        except Exception:  # the trainer must never die of its monitor
            log.exception("gradwatch: step %d: monitoring failed; the step proceeds unguarded", self.monitor.step)
            try:
                self.monitor.recover()
            except Exception:
                log.exception("gradwatch: step %d: could not join the other ranks' guard decision", self.monitor.step)

    def _post_hook(self, optimizer, args, kwargs) -> None:
        try:
            self.monitor.after_step()
        except Exception:
            log.exception("gradwatch: step %d: measuring the update failed", self.monitor.step)

    def state_dict(self) -> dict:
        """What a resumed run needs to carry on where this one stopped."""
        return {"version": 1, "step": self.monitor.step}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise ValueError(f"gradwatch: unsupported agent state version {state.get('version')!r}")
        self.monitor.step = int(state["step"])
        self.telemetry.update(step=self.monitor.step)

    def close(self) -> None:
        """Remove every hook and stop the endpoint. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        _watched.discard(self._optimizer)
        self.monitor.flush()
        self._server.close()

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def watch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, run: str, **settings) -> Agent:
    """Attach gradwatch to an unmodified training loop and start its /metrics endpoint.

    Settings are :class:`~gradwatch.agent.config.AgentConfig` fields (``every``, ``port``, ...);
    a bad one raises ``ValueError`` naming it before anything is attached.
    """
    return Agent(model, optimizer, build_config(run, settings))
