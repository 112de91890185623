"""Watchdog commands inside the trainer: taken between steps, applied on every rank at the same step.

Rank 0's control thread fills an inbox; at the start of each optimizer step rank 0
takes what is there, the guard's all-reduce tells every rank how many commands
arrived, and rank 0 broadcasts them, so all ranks apply them at the same step.
Rank 0 acknowledges each with that step (or the reason it was refused).
``checkpoint`` and ``stop`` run user callbacks after the step's update. ``rollback``
restores a saved state before the step's update (rollback.py) and the step is then
skipped: its gradients were computed on the state being abandoned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch.distributed as dist

from gradwatch.agent.control import ControlClient
from gradwatch.agent.remedy import Refused, Remediation
from gradwatch.agent.rollback import Rollbacks
from gradwatch.agent.telemetry import Telemetry
from gradwatch.watchdog.schema import Ack, Rollback, SignedCommand

log = logging.getLogger("gradwatch.agent")

CALLBACK_ACTIONS = ("checkpoint", "stop")


class CommandRouter:
    def __init__(self, control: ControlClient | None, remedy: Remediation, telemetry: Telemetry, run: str, rank: int):
        self.control = control
        self.remedy = remedy
        self.telemetry = telemetry
        self.run = run
        self.rank = rank
        self.callbacks: dict[str, list[Callable[[int], None]]] = {a: [] for a in CALLBACK_ACTIONS}
        self._deferred: list[SignedCommand] = []
        self.rollbacks: Rollbacks | None = None  # set by the agent
        self.rolled_back = False  # a rollback was applied at this step: the monitor skips its update

    def take(self) -> list[SignedCommand]:
        return self.control.drain() if self.control is not None else []

    @staticmethod
    def broadcast(commands: list[SignedCommand]) -> list[SignedCommand]:
        """Rank 0's commands to every rank (a collective; only called when the all-reduce counted some)."""
        box = [[c.model_dump(mode="json") for c in commands]]
        dist.broadcast_object_list(box, src=0)
        return [SignedCommand.model_validate(c) for c in box[0]]

    def apply(self, commands: list[SignedCommand], step: int) -> None:
        """Before the update of ``step``: LR and clipping changes take effect for this very step."""
        for signed in commands:
            spec = signed.command.spec
            if spec.action in CALLBACK_ACTIONS:
                self._deferred.append(signed)
                continue
            restored = None
            try:
                if isinstance(spec, Rollback):
                    if self.rollbacks is None:
                        raise Refused("rollback is not available on this agent")
                    detail, restored = self.rollbacks.apply(spec, step)
                    self.rolled_back = True
                else:
                    detail = self.remedy.apply(spec)
            except Refused as exc:
                self._ack(signed, "refused", step, str(exc))
                log.warning("gradwatch: step %d: refused %s (%s): %s", step, spec.action, signed.command.reason, exc)
                continue
            except Exception as exc:  # e.g. a user's on_rollback callback raised: the run goes on as it is
                log.exception("gradwatch: step %d: %s failed", step, spec.action)
                self._ack(signed, "refused", step, f"{spec.action} failed: {exc}")
                continue
            self.telemetry.count("commands", spec.action)
            self._ack(signed, "applied", step, detail, restored)
            log.warning("gradwatch: step %d: applied %s (%s): %s", step, spec.action, signed.command.reason, detail)
        self.publish()

    def after_step(self, step: int) -> None:
        """After the update: run checkpoint/stop callbacks asked for at this step."""
        deferred, self._deferred = self._deferred, []
        for signed in deferred:
            action = signed.command.spec.action
            handlers = self.callbacks[action]
            if not handlers:
                self._ack(signed, "unsupported", step, f"no {action} callback registered on the agent")
                continue
            try:
                for handler in handlers:
                    handler(step)
            except Exception as exc:  # a user callback failing must not kill the run either
                log.exception("gradwatch: %s callback failed", action)
                self._ack(signed, "refused", step, f"{action} callback raised: {exc}")
                continue
            self.telemetry.count("commands", action)
            self._ack(signed, "applied", step, f"{action} callback ran")

    def publish(self) -> None:
        r = self.remedy
        self.telemetry.update(lr_scale=r.lr_scale, clipping_active=r.clipping_active, clip_threshold=r.clip_threshold)

    def _ack(self, signed: SignedCommand, status: str, step: int, detail: str, restored: int | None = None) -> None:
        if self.control is None or self.rank != 0:
            return
        r = self.remedy
        self.control.ack(
            Ack(
                command_id=signed.command.id,
                run=self.run,
                rank=self.rank,
                status=status,
                step=step,
                detail=detail[:1024],
                at=time.time(),
                lr_scale=r.lr_scale,
                clipping=r.clip_mode,
                clip_threshold=r.clip_threshold,
                restored_step=restored,
            )
        )
