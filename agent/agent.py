"""The object a training script holds: attach with ``watch()``, detach with ``close()``."""

from __future__ import annotations

import logging
import os
import socket
import uuid
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
from gradwatch.agent.params import check_model, collect, unwrap_optimizer
from gradwatch.agent.monitor import StepMonitor
from gradwatch.agent.remedy import Bounds, Remediation
from gradwatch.agent.rollback import Rollbacks, agent_state, load_agent_state
from gradwatch.agent.scaler import ScalerWatch
from gradwatch.agent.server import MetricsServer
from gradwatch.agent.snapshots import SnapshotRing
from gradwatch.agent.telemetry import Telemetry
from gradwatch.agent.throttle import Throttled
from gradwatch.watchdog.schema import Registration, read_secret

log = logging.getLogger("gradwatch.agent")

T = TypeVar("T")
_watched: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
_identities: "weakref.WeakValueDictionary[tuple[str, int], Agent]" = weakref.WeakValueDictionary()
"""Live agents by (run, rank): two in one process would export and register as one identity."""


class Agent:
    """Watches one model/optimizer pair: per-layer telemetry, the step guard and the /metrics endpoint.

    Lifecycle: built by :func:`watch`; every ``optimizer.step()`` then runs the guard and,
    on sampled steps, the probe; :meth:`observe` reports the loss; :meth:`close` removes
    the hooks and stops the endpoint, leaving the optimizer as it was.
    """

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: AgentConfig, scaler: object = None
    ) -> None:
        # Every check comes before anything is attached: a refused watch() leaves nothing behind.
        model = check_model(model)
        optimizer = unwrap_optimizer(optimizer)
        if optimizer in _watched:
            raise ValueError("gradwatch.watch: this optimizer is already watched; close() the other agent first")
        ranks = distributed.rank_info()
        identity = (config.run, ranks.rank)
        if identity in _identities:
            raise ValueError(
                f"gradwatch.watch: run {config.run!r} rank {ranks.rank} is already watched in this process "
                f"(metrics at {_identities[identity].url}); close() that agent first, or give this one its own run name "
                "(e.g. one run per optimizer)"
            )
        params, names = collect(model, optimizer)
        self.config = config
        self.ranks = ranks
        self._optimizer = optimizer
        self._handles: list = []
        self._warn = Throttled(log)
        self.entered = 0
        """Calls of the optimizer's step() so far (GradScaler's skips are told apart by it)."""
        self._server: MetricsServer | None = None
        self.control: ControlClient | None = None
        self._scaler: ScalerWatch | None = None
        self._ring = None  # built first: a budget that cannot hold one snapshot is refused before anything is attached
        if config.snapshots is not None:
            self._ring = SnapshotRing(config.snapshots, model, optimizer, lambda: agent_state(self.monitor, self.remedy),
                                      lambda state: load_agent_state(self.monitor, self.remedy, state))
        try:
            self._attach(model, optimizer, params, names)
            if scaler is not None:
                self._scaler = ScalerWatch(scaler, lambda: self.entered, self.monitor.skipped_by_scaler)
                self.monitor.loss_scale = self._scaler.scale
                self.telemetry.count("skipped", "amp_overflow", 0)  # the series exists from the start
        except BaseException:
            self._release()  # the port, the control thread, any hook: a retry starts from nothing
            raise
        _watched.add(optimizer)
        _identities[identity] = self
        log.info("gradwatch: watching run %r (rank %d), metrics at %s", config.run, self.ranks.rank, self.url)

    def _attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, params: list, names: list[str]) -> None:
        config = self.config
        layer_map = LayerMap(names, [p.numel() for p in params], config.layers, config.top_k)
        self.telemetry = Telemetry(layer_map.depth())
        self.remedy = Remediation(
            Bounds(config.max_lr_cuts, config.lr_cut_window_s, config.lr_cut_cooldown_s, config.min_lr_scale)
        )
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = GradwatchCollector(self.telemetry, config.run, self.ranks.rank)
        self.registry.register(self.collector)
        port = config.port or 0
        if port and self.ranks.distributed:
            port += self.ranks.local_rank
        self._server = MetricsServer(self.collector, config.host, min(port, 65535))
        self.control = self._connect(config)
        self.commands = CommandRouter(self.control, self.remedy, self.telemetry, config.run, self.ranks.rank)
        self.commands.publish()
        self.monitor = StepMonitor(
            params, layer_map, self.telemetry, optimizer, config, self.ranks, self.remedy, self.commands, model=model
        )
        self.rollbacks = Rollbacks(self._ring, self.remedy, self.ranks, self._restore_step)
        self.commands.rollbacks = self.rollbacks
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]

    @property
    def layer_map(self) -> LayerMap:
        """The current `layer` labels (rebuilt when param groups are added after watch())."""
        return self.monitor.layer_map

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
            instance=uuid.uuid4().hex,  # names this agent process to the watchdog (contract 1)
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
        """The metrics endpoint, e.g. ``http://127.0.0.1:9465/metrics`` (empty once closed)."""
        return self._server.url if self._server is not None else ""

    @property
    def step(self) -> int:
        """Optimizer steps attempted since attach (or restored by load_state_dict)."""
        return self.monitor.step

    def observe(self, loss=None) -> None:
        """Report a loss (a tensor stays on its device; no sync here). Call it once per micro-batch under
        gradient accumulation: the loss exported for an optimizer step is the mean of the values
        observed since the previous step (observed inside a step's closure, it counts for that step).

        Never raises into the training loop: a tensor with several elements is reduced by
        its mean, a number too large for a float is recorded as inf, and a value that is
        not a real number (a string, None) is dropped; each logged once (throttled).
        """
        try:
            if loss is None:
                raise TypeError("loss is None")
            self.monitor.observe_loss(loss)
        except Exception as exc:
            self._warn.warning(
                "observe", "gradwatch: observe(loss=<%s>) ignored: %s (training continues)", type(loss).__name__, exc
            )

    def _pre_hook(self, optimizer, args, kwargs):
        """Before the update. A plain ``step()``: the gradients are there, guard and measure them now.
        ``step(closure)``: forward and backward run inside step() (Lightning's automatic optimization,
        LBFGS), so the closure is wrapped and the gradients are guarded and measured once it has run."""
        self.entered += 1
        closure = kwargs["closure"] if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if closure is None:
            self._guarded(self.monitor.before_step)
            return None
        self._guarded(self.monitor.begin_closure_step)
        wrapped = self._wrap_closure(closure)
        if "closure" in kwargs:
            return args, {**kwargs, "closure": wrapped}
        return (args[0], wrapped, *args[2:]), kwargs

    def _wrap_closure(self, closure: Callable):
        def guarded_closure(*args, **kwargs):
            loss = closure(*args, **kwargs)
            self._guarded(self.monitor.closure_evaluated)
            return loss

        return guarded_closure

    def _guarded(self, part: Callable[[], None]) -> None:
        try:
            part()
        except Exception:  # the trainer must never die of its monitor; one log line per interval, with a count
            self._warn.exception(
                "failed", "gradwatch: step %d: monitoring failed; the step proceeds unguarded", self.monitor.step
            )
            try:
                self.monitor.recover()
            except Exception:
                self._warn.exception(
                    "recover", "gradwatch: step %d: could not join the other ranks' guard decision", self.monitor.step
                )

    def _post_hook(self, optimizer, args, kwargs) -> None:
        try:
            self.monitor.after_step()
            self.rollbacks.after_step(self.monitor.step, self.monitor.step_held, self.monitor.global_norm)
        except Exception:
            self._warn.exception("after", "gradwatch: step %d: measuring the update failed", self.monitor.step)

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
        """Remove every hook and stop the endpoint. Safe to call twice.

        Returns within about a second whatever the watchdog does: the last acknowledgements
        and the goodbye to the watchdog are sent in the background, with a bounded deadline.
        """
        if self._handles:
            try:
                self.monitor.flush()
            except Exception as exc:
                log.warning("gradwatch: the last observed loss could not be read at close: %s", exc)
        self._release()

    def _release(self) -> None:
        """Give back whatever this agent holds: hooks, the control thread, the port, its identity."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        _watched.discard(self._optimizer)
        if self._scaler is not None:
            self._scaler.close()
            self._scaler = None
        if _identities.get((self.config.run, self.ranks.rank)) is self:
            del _identities[(self.config.run, self.ranks.rank)]
        if self.control is not None:
            self.control.close()
            self.control = None
        if self._server is not None:
            self._server.close()
            self._server = None

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def watch(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, run: str, *, scaler: object = None, **settings
) -> Agent:
    """Attach gradwatch to an unmodified training loop and start its /metrics endpoint.

    ``optimizer`` may be a framework's wrapper of a torch optimizer (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer): the torch optimizer inside is watched. Settings are
    :class:`~gradwatch.agent.config.AgentConfig` fields (``every``, ``port``, ...); a bad one, a
    ``model`` that is not a module or an ``optimizer`` that is not one raises ``ValueError`` naming
    it before anything is attached.

    ``scaler``: the ``torch.amp.GradScaler`` stepping this optimizer, if any: its skips are then counted
    (``gradwatch_skipped_steps_total{reason="amp_overflow"}``, and in ``gradwatch_step``) and its loss
    scale exported (``gradwatch_loss_scale``).
    """
    return Agent(model, optimizer, build_config(run, settings), scaler=scaler)
