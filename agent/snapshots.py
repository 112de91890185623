"""Recent good states kept in host memory, so a `rollback` command can go back to one.

A snapshot holds what the next step depends on: the parameters (and the model's
buffers), the optimizer's state and hyperparameters, the learning-rate scheduler
and any other object given in ``include`` (through their ``state_dict()``), the
agent's own step, spike history and healthy-norm history, and the RNG states
(torch CPU and CUDA, Python's ``random``, NumPy's if loaded). Tensors are copied
into host buffers that the ring reuses, so a snapshot allocates nothing once the
ring is full. Restoring copies them back in place (the tensors the model, DDP and
the optimizer hold stay the same objects), so a restored state is bit-identical to
the one saved.

Snapshots are taken after the update of every ``every``-th step, only when the
guard held none of the last ``every`` steps (no skip, no spike clipped): a state
saved in the middle of trouble is no state to go back to.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

log = logging.getLogger("gradwatch.agent")

DEFAULT_MEMORY_SHARE = 0.25
"""Without ``max_bytes``, the ring may use this share of the host memory available at attach."""

# Optimizer state per parameter element, in multiples of the parameter, for optimizers whose state is
# created lazily at their first step (the attach-time budget check cannot measure it yet).
_STATE_COPIES = {"Adam": 2, "AdamW": 2, "NAdam": 2, "RAdam": 2, "Adamax": 2, "Adagrad": 1, "Adadelta": 2, "Rprop": 2}
_UNKNOWN_STATE_COPIES = 2


class SnapshotConfig(BaseModel):
    """``watch(..., snapshots={"every": 100, "keep": 4, "include": [scheduler]})``."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    every: int = Field(default=100, ge=1, description="Take a snapshot after every N-th optimizer step (when healthy).")
    keep: int = Field(default=4, ge=1, description="Snapshots kept (a ring: the oldest goes first). "
                      "every x keep steps is how far back a rollback can go; PaLM went ~100 steps back.")
    max_bytes: int | None = Field(
        default=None, gt=0,
        description="Host memory the ring may use. Default: a quarter of the memory available at attach. "
        "Checked at attach: if it cannot hold one snapshot, watch() raises; if it holds fewer than `keep`, fewer are kept.",
    )
    include: list[Any] = Field(
        default_factory=list,
        description="Other objects whose state_dict()/load_state_dict() go with each snapshot: "
        "the LR scheduler, a GradScaler, a stateful sampler.",
    )
    max_rollbacks: int = Field(default=3, ge=1, description="At most this many rollbacks per rollback_window_steps.")
    rollback_window_steps: int = Field(
        default=10_000, ge=1, description="Steps attempted (rolled-back ones count too) over which max_rollbacks holds."
    )

    @field_validator("include")
    @classmethod
    def _stateful(cls, objects: list[Any]) -> list[Any]:
        for i, obj in enumerate(objects):
            if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
                raise ValueError(f"include[{i}] ({type(obj).__name__}) has no state_dict()/load_state_dict()")  # noqa: TRY004 (pydantic reports ValueError)
        return objects


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def available_memory() -> int | None:
    """Bytes of host memory available now (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class Snapshot:
    step: int
    tensors: list[Tensor]  # host copies of the parameters and buffers, in SnapshotRing.tensors order
    optimizer: list[dict[str, Any]]  # per parameter: its optimizer state, tensors copied to the host
    groups: list[dict[str, Any]]  # param_groups without "params"
    agent: dict[str, Any]
    rng: dict[str, Any]
    included: list[Any]
    nbytes: int = 0
    devices: dict[int, dict[str, torch.device]] = field(default_factory=dict)


def _host_copy(value: Any, reuse: Any = None) -> Any:
    if isinstance(value, Tensor):
        if isinstance(reuse, Tensor) and reuse.shape == value.shape and reuse.dtype == value.dtype:
            return reuse.copy_(value.detach())
        return value.detach().to("cpu", copy=True)
    return copy.deepcopy(value)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        state["numpy"] = numpy.random.get_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        sys.modules["numpy"].random.set_state(state["numpy"])


class SnapshotRing:
    """The ring of recent good states of one model/optimizer pair (and what ``include`` names).

    ``agent_state()`` gives the agent's own part of a snapshot and ``load_agent_state(state)``
    puts it back; both come from the agent, which owns that state.
    """

    def __init__(self, config: SnapshotConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 agent_state, load_agent_state) -> None:
        self.config = config
        self.optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        seen = {id(p) for p in self.params}
        self.tensors = self.params + [b for b in model.buffers() if id(b) not in seen]
        self.agent_state = agent_state
        self.load_agent_state = load_agent_state
        self.ring: deque[Snapshot] = deque()
        self.estimate = self._estimate()
        budget = config.max_bytes
        if budget is None:
            available = available_memory()
            budget = int(DEFAULT_MEMORY_SHARE * available) if available else self.estimate * config.keep
        self.max_bytes = budget
        fits = budget // max(self.estimate, 1)
        if fits < 1:
            raise ValueError(
                f"gradwatch.watch: snapshots.max_bytes = {budget:,} cannot hold one snapshot of about {self.estimate:,} "
                f"bytes (parameters, buffers and the optimizer's state); raise snapshots.max_bytes or turn snapshots off"
            )
        self.keep = min(config.keep, fits)
        if self.keep < config.keep:
            log.warning("gradwatch: the snapshot budget (%s bytes) holds %d snapshots of about %s bytes, not %d",
                        f"{budget:,}", self.keep, f"{self.estimate:,}", config.keep)
        self._broken = False

    def _estimate(self) -> int:
        """Bytes of one snapshot: measured where the optimizer already has state, else estimated from its type."""
        own = tensor_bytes(self.tensors)
        state = [v for p in self.params for v in self.optimizer.state.get(p, {}).values() if isinstance(v, Tensor)]
        if state:
            return own + tensor_bytes(state)
        copies = _STATE_COPIES.get(type(self.optimizer).__name__, _UNKNOWN_STATE_COPIES)
        if type(self.optimizer).__name__ == "SGD":
            copies = int(any(g.get("momentum", 0) for g in self.optimizer.param_groups))
        elif type(self.optimizer).__name__ == "RMSprop":
            copies = 1 + any(g.get("momentum", 0) for g in self.optimizer.param_groups) + any(
                g.get("centered") for g in self.optimizer.param_groups)
        return own + copies * tensor_bytes(self.params)

    @property
    def steps(self) -> list[int]:
        return [s.step for s in self.ring]

    @torch.no_grad()
    def take(self, step: int) -> Snapshot | None:
        """Save the state after the update of ``step``; reuses the oldest snapshot's buffers once the ring is full.
        Copies every tensor to the host (a device sync on accelerators)."""
        if self._broken:
            return None
        reuse = self.ring.popleft() if len(self.ring) >= self.keep else None
        tensors = [_host_copy(t, reuse.tensors[i] if reuse else None) for i, t in enumerate(self.tensors)]
        optimizer, devices = [], {}
        for i, p in enumerate(self.params):
            state = self.optimizer.state.get(p, {})
            old = reuse.optimizer[i] if reuse and i < len(reuse.optimizer) else {}
            optimizer.append({k: _host_copy(v, old.get(k)) for k, v in state.items()})
            devices[i] = {k: v.device for k, v in state.items() if isinstance(v, Tensor)}
        groups = [{k: _host_copy(v) for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        snapshot = Snapshot(
            step=step, tensors=tensors, optimizer=optimizer, groups=groups, agent=self.agent_state(),
            rng=_rng_state(), included=[copy.deepcopy(obj.state_dict()) for obj in self.config.include],
            devices=devices,
        )
        snapshot.nbytes = tensor_bytes(tensors) + tensor_bytes(
            v for s in optimizer for v in s.values() if isinstance(v, Tensor))
        if snapshot.nbytes > self.max_bytes:
            self._broken = True
            self.ring.clear()
            log.error("gradwatch: a snapshot takes %s bytes, over snapshots.max_bytes = %s: snapshots are off",
                      f"{snapshot.nbytes:,}", f"{self.max_bytes:,}")
            return None
        self.ring.append(snapshot)
        while sum(s.nbytes for s in self.ring) > self.max_bytes:
            self.ring.popleft()
        return snapshot

    def newest(self, before: int | None, floor: int) -> Snapshot | None:
        """The newest snapshot of a step < ``before`` (any step when None) and >= ``floor``."""
        for snapshot in reversed(self.ring):
            if (before is None or snapshot.step < before) and snapshot.step >= floor:
                return snapshot
        return None

    @torch.no_grad()
    def restore(self, snapshot: Snapshot) -> None:
        """Put everything back as it was after ``snapshot.step``; snapshots of later steps are dropped
        (they belong to the abandoned trajectory)."""
        for t, copied in zip(self.tensors, snapshot.tensors):
            t.copy_(copied)
        state = self.optimizer.state
        for i, p in enumerate(self.params):
            saved = snapshot.optimizer[i]
            if not saved:
                state.pop(p, None)
                continue
            current = state[p]
            for key in [k for k in current if k not in saved]:
                del current[key]
            for key, value in saved.items():
                if isinstance(value, Tensor):
                    now = current.get(key)
                    if isinstance(now, Tensor) and now.shape == value.shape and now.dtype == value.dtype:
                        now.copy_(value)
                    else:
                        current[key] = value.to(snapshot.devices[i][key], copy=True)
                else:
                    current[key] = copy.deepcopy(value)
        for group, settings in zip(self.optimizer.param_groups, snapshot.groups):
            for key, value in settings.items():
                if isinstance(value, Tensor) and isinstance(group.get(key), Tensor):
                    group[key].copy_(value)
                else:
                    group[key] = copy.deepcopy(value)
        for obj, saved in zip(self.config.include, snapshot.included):
            obj.load_state_dict(copy.deepcopy(saved))
        self.load_agent_state(snapshot.agent)
        _set_rng_state(snapshot.rng)
        while self.ring and self.ring[-1].step > snapshot.step:
            self.ring.pop()
