"""Which tensors the agent watches: the optimizer behind a framework's wrapper, and its parameters
with their `layer` labels. Read at attach, and again whenever the optimizer's param groups change
(``add_param_group`` after ``watch()``, the usual "unfreeze the backbone" step)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradwatch.agent.layers import canonical_names

_INNER = ("optimizer", "_optimizer")
"""Where wrappers keep the torch optimizer: accelerate's AcceleratedOptimizer (``.optimizer``),
Lightning's LightningOptimizer (``._optimizer``)."""
_MAX_DEPTH = 8


def check_model(model: object) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"gradwatch.watch: model must be a torch.nn.Module; got {type(model).__name__}")
    return model


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The torch optimizer itself, from it or from a wrapper holding one; ValueError naming the argument otherwise."""
    if optimizer is None:
        raise ValueError(
            "gradwatch.watch: optimizer is None; pass the torch.optim.Optimizer that steps this model "
            "(under a framework that builds it lazily, attach once it exists)"
        )
    # A wrapper is unwrapped even when it subclasses Optimizer: AcceleratedOptimizer does, without
    # Optimizer.__init__ (so it has no hook dicts of its own), and steps the optimizer inside.
    found = optimizer
    for _ in range(_MAX_DEPTH):
        inner = _inner(found)
        if inner is None:
            break
        found = inner
    if isinstance(found, torch.optim.Optimizer):
        return found
    raise ValueError(
        f"gradwatch.watch: optimizer must be a torch.optim.Optimizer or a wrapper holding one "
        f"(accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer); got {type(optimizer).__name__}"
    )


def _inner(wrapper: object, depth: int = _MAX_DEPTH) -> object | None:
    """The object ``wrapper`` holds that is, or leads to, a torch optimizer (None when none)."""
    if depth == 0:
        return None
    for attr in _INNER:
        try:
            inner = getattr(wrapper, attr, None)
        except Exception:  # a property of an arbitrary object may raise anything
            continue
        if inner is not None and inner is not wrapper and (
            isinstance(inner, torch.optim.Optimizer) or _inner(inner, depth - 1) is not None
        ):
            return inner
    return None


def signature(optimizer: torch.optim.Optimizer) -> tuple[int, ...]:
    """Changes when a param group is added or a group's parameter list grows (checked every step: a few µs)."""
    return tuple(len(group["params"]) for group in optimizer.param_groups)


def collect(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[Tensor], list[str]]:
    """The optimizer's parameters with elements and their canonical labels, in model order (so
    `gradwatch_layer_depth` runs from input to output whatever the order of the param groups); a
    parameter the model does not hold is labelled ``group{g}.param{i}`` and comes last."""
    names = canonical_names(model)
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
    position = {key: i for i, key in enumerate(names)}
    kept.sort(key=lambda item: position.get(id(item[0]), len(position)))
    if not kept:
        raise ValueError("gradwatch.watch: every parameter the optimizer holds has zero elements; nothing to watch")
    return [p for p, _ in kept], [label for _, label in kept]
