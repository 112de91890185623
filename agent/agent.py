"""The object a training script holds: attach with ``watch()``, detach with ``close()``."""

from __future__ import annotations

import logging
import os
import socket
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch
from prometheus_client import CollectorRegistry

from gradwatch.agent import distributed
from gradwatch.agent.commands import CommandRouter
from gradwatch.agent.config import AgentConfig, build_config
from gradwatch.agent.control import ControlClient
from gradwatch.agent.exporter import GradwatchCollector
from gradwatch.agent.layers import LayerMap
from gradwatch.agent.monitor import StepMonitor
from gradwatch.agent.remedy import Bounds, Remediation
from gradwatch.agent.rollback import Rollbacks, agent_state, load_agent_state
from gradwatch.agent.server import MetricsServer
from gradwatch.agent.snapshots import SnapshotRing
from gradwatch.agent.telemetry import Telemetry
from gradwatch.watchdog.schema import Registration, read_secret

log = logging.getLogger("gradwatch.agent")

T = TypeVar("T")
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
    # A parameter with no elements has no gradient values to measure or guard (and would make every
    # reduction of its statistics fail): it gets no layer label. A skipped step still clears its gradient.
    kept = [(p, label) for p, label in zip(params, labels) if p.numel() > 0]
    if not kept:
        raise ValueError("gradwatch.watch: every parameter the optimizer holds has zero elements; nothing to watch")
    return [p for p, _ in kept], [label for _, label in kept]


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
        ring = None  # built first: a budget that cannot hold one snapshot is refused before anything is attached
        if config.snapshots is not None:
            ring = SnapshotRing(config.snapshots, model, optimizer, lambda: agent_state(self.monitor, self.remedy),
                                lambda state: load_agent_state(self.monitor, self.remedy, state))
        self.layer_map = LayerMap(names, [p.numel() for p in params], config.layers, config.top_k)
        self.telemetry = Telemetry(self.layer_map.depth())
        self.remedy = Remediation(
            Bounds(config.max_lr_cuts, config.lr_cut_window_s, config.lr_cut_cooldown_s, config.min_lr_scale)
        )
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = GradwatchCollector(self.telemetry, config.run, self.ranks.rank)
        self.registry.register(self.collector)
        port = config.port
        if port and self.ranks.distributed:
            port += self.ranks.local_rank
        self._server = MetricsServer(self.registry, self.collector, config.host, port)
        self.control = self._connect(config)
        self.commands = CommandRouter(self.control, self.remedy, self.telemetry, config.run, self.ranks.rank)
        self.commands.publish()
        self.monitor = StepMonitor(
            params, self.layer_map, self.telemetry, optimizer, config, self.ranks, self.remedy, self.commands
        )
        self.rollbacks = Rollbacks(ring, self.remedy, self.ranks, self._restore_step)
        self.commands.rollbacks = self.rollbacks
        self._optimizer = optimizer
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]
        _watched.add(optimizer)
        log.info("gradwatch: watching run %r (rank %d), metrics at %s", config.run, self.ranks.rank, self.url)

    def _connect(self, config: AgentConfig) -> ControlClient | None:
        url = config.watchdog_url or os.environ.get("GRADWATCH_URL")
        if not url:
            return None
        registration = Registration(
            run=config.run,
            rank=self.ranks.rank,
            world_size=self.ranks.world_size,
            metrics_url=self.url,
            pid=os.getpid(),
            hostname=socket.gethostname(),
        )
        return ControlClient(
            url, read_secret(config.secret_file), registration,
            poll=self.ranks.rank == 0, poll_interval_s=config.poll_interval_s,
        )

    def on_checkpoint(self, callback: Callable[[int], None]) -> None:
        """Run ``callback(step)`` after the update of the step at which a `checkpoint` command arrives."""
        self.commands.callbacks["checkpoint"].append(callback)

    def on_stop(self, callback: Callable[[int], None]) -> None:
        """Run ``callback(step)`` when a `stop` command arrives (e.g. set a flag the loop checks to end gracefully)."""
        self.commands.callbacks["stop"].append(callback)

    def on_rollback(self, callback: Callable[[int], int]) -> None:
        """Without snapshots: ``callback(step)`` loads the user's checkpoint at or before ``step`` (model,
        optimizer, scheduler) when a `rollback` command arrives, and returns the step it loaded."""
        self.rollbacks.callbacks.append(callback)

    def should_skip(self) -> bool:
        """Call once per batch before training on it; True for the batches a rollback asked to skip::

            for batch in loader:
                if agent.should_skip():
                    continue
        """
        return self.rollbacks.should_skip()

    def skipping(self, batches: Iterable[T]) -> Iterator[T]:
        """``for batch in agent.skipping(loader):`` — the same as calling :meth:`should_skip` per batch."""
        return self.rollbacks.skipping(batches)

    def _restore_step(self, step: int) -> None:
        self.monitor.step = step
        self.telemetry.update(step=step)

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
            self.rollbacks.after_step(self.monitor.step, self.monitor.held, self.monitor.global_norm)
        except Exception:
            log.exception("gradwatch: step %d: measuring the update failed", self.monitor.step)

    def state_dict(self) -> dict:
        """What a resumed run needs to carry on where this one stopped: the step count,
        the remediation in force (LR scale, clipping) and the ids of commands already applied."""
        return {
            "version": 1,
            "step": self.monitor.step,
            "remediation": self.remedy.state_dict(),
            "spikes": self.monitor.spikes.state_dict() if self.monitor.spikes is not None else None,
            "commands_seen": self.control.seen_ids() if self.control is not None else [],
            "rollbacks": self.rollbacks.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise ValueError(f"gradwatch: unsupported agent state version {state.get('version')!r}")
        self.monitor.step = int(state["step"])
        self.remedy.load_state_dict(state["remediation"])
        if self.monitor.spikes is not None and state.get("spikes"):
            self.monitor.spikes.load_state_dict(state["spikes"])
        if self.control is not None:
            self.control.mark_seen(state["commands_seen"])
        if state.get("rollbacks"):  # the budget spent and the floor survive a resume (snapshots do not)
            self.rollbacks.load_state_dict(state["rollbacks"])
        self.telemetry.update(step=self.monitor.step)
        self.commands.publish()

    def close(self) -> None:
        """Remove every hook and stop the endpoint. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        _watched.discard(self._optimizer)
        self.monitor.flush()
        if self.control is not None:
            self.control.close()
            self.control = None
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
