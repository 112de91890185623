"""Per-layer gradient statistics: pure tensor math, no host synchronisation.

Every function takes lists of tensors (one per layer) and returns float32 tensors
on the first tensor's device, under ``torch.no_grad()``. Nothing here calls ``.item()``,
logs or touches Prometheus: the agent moves the results to the host once per
step (see ``agent.monitor``).

A :class:`Layout` says how to walk one list of tensors; the monitor builds it once
and reuses it every step. Kernel choice (measured by ``benchmarks/``, FIELD_NOTES §2):
on CUDA the multi-tensor ``torch._foreach_norm`` kernels cover L2, L1 and max in a
few launches. On CPU each op costs a few µs of dispatch whatever its size, which
outweighs reading a small tensor: small tensors of one shape are stacked (one copy into
a buffer the layout keeps, in stacks of at most ``STACK_MAX_BYTES``) so that one reduction
per statistic covers a whole stack (the L2 norms of the 406-tensor benchmark model: 0.12 ms
instead of 0.44 ms with ``_foreach_norm``; all five statistics 0.40 ms). Larger tensors are read
one by one: ``abs`` written into a buffer the layout keeps (see :class:`_Scratch`), then the L2
norm, ``sum``, ``amax`` and ``amin`` of that buffer while it is in cache (``_foreach_norm`` with
ord=1 or inf is 3–12× slower than ord=2 on CPU, ``vector_norm(ord=1)`` 3× slower than this).
The guard's every-step L2 norms of such tensors come from ``_foreach_norm``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

# Columns of the matrix returned by grad_stats, in order.
GRAD_NORM, GRAD_L1, GRAD_ABS_MAX, GRAD_ABS_MIN, PARAM_NORM = range(5)
N_COLUMNS = 5

STACK_MAX_BYTES = 4 * 1024 * 1024
"""The largest stack of same-shape CPU tensors. Each stack is copied into a buffer of its own,
allocated once: a fresh temporary over glibc's mmap threshold (128 KB) comes as fresh pages each
step, whose page faults cost more than the copy (stacking 100 16-KB gradients into a fresh
tensor: 1.9 ms and ~900 page faults; all five statistics of the 406-tensor model: 0.88 ms in
fresh 4-MB stacks, 0.62 ms in fresh 128-KB stacks, 0.40 ms in kept 4-MB stacks)."""

STACKABLE_BYTES = 128 * 1024
"""Only tensors up to this size are stacked, and all stacks of one list hold at most
``STACKED_MAX_BYTES``: the kept buffers are a copy of a model's small tensors, not of the model."""
STACKED_MAX_BYTES = 64 * 1024 * 1024

SCRATCH_ELEMENTS = 1 << 20
"""The largest piece of one tensor whose |g| is written to the scratch buffer at a time (4 MB in
float32; measured on a 4096x1024 gradient: 0.79 ms in pieces of 2^20 elements, 0.93 ms of 2^16,
0.96 ms of 2^22, 3.3 ms with a fresh ``abs()`` temporary)."""


@dataclass(frozen=True)
class _Group:
    """Tensors read together: ``stacked`` ones share device, shape and dtype and become one
    ``[k, numel]`` tensor; the others share a device and are read by multi-tensor kernels
    (CUDA) or one by one (CPU). ``acc``: the dtype gradient sums accumulate in."""

    index: list[int]
    stacked: bool
    on_cpu: bool
    acc: torch.dtype
    buffers: dict[str, Tensor] = field(default_factory=dict, compare=False)  # a stacked group's kept copies

    def rows(self, tensors: list[Tensor], role: str) -> Tensor:
        """``tensors`` (this stacked group's, all of one shape) as ``[k, numel]``, copied into the
        group's buffer for ``role``: the caller may change it in place until its next call."""
        buffer = self.buffers.get(role)
        if buffer is None:
            t = tensors[0]
            buffer = self.buffers[role] = torch.empty((len(tensors), *t.shape), dtype=t.dtype, device=t.device)
        return torch.stack(tensors, out=buffer).view(len(tensors), -1)


class _Grouping:
    """One split of a list of tensors into groups, and the way back to the list's order.

    CPU tensors of one shape and dtype, each at most ``STACKABLE_BYTES``, are stacked, up to
    ``STACK_MAX_BYTES`` a stack and ``STACKED_MAX_BYTES`` in all, where a stack holds at least
    ``min_stack`` of them; the rest go in one group per device.
    """

    def __init__(self, tensors: list[Tensor], min_stack: int) -> None:
        by_device: dict[torch.device, list[int]] = {}
        for i, t in enumerate(tensors):
            by_device.setdefault(t.device, []).append(i)
        self.groups: list[_Group] = []
        room = STACKED_MAX_BYTES
        for device, index in by_device.items():
            shapes: dict[tuple, list[int]] = {}
            alone = []
            for i in index:
                t = tensors[i]
                if device.type == "cpu":
                    shapes.setdefault((t.shape, t.dtype), []).append(i)
                else:
                    alone.append(i)
            for group in shapes.values():
                t = tensors[group[0]]
                size = max(t.numel() * t.element_size(), 1)
                per_stack = max(STACK_MAX_BYTES // size, 1)
                for start in range(0, len(group), per_stack):
                    chunk = group[start : start + per_stack]
                    if len(chunk) >= min_stack and size <= STACKABLE_BYTES and len(chunk) * size <= room:
                        self.groups.append(_Group(chunk, True, True, _acc(t.dtype)))
                        room -= len(chunk) * size
                    else:
                        alone += chunk
            if alone:
                alone.sort()
                self.groups.append(_Group(alone, False, device.type == "cpu", _wide([tensors[i] for i in alone])))
        order = [i for group in self.groups for i in group.index]
        # Results come out group after group; this index puts them back in the tensors' order.
        self._restore = None if order == sorted(order) else torch.argsort(torch.tensor(order)).to(tensors[0].device)

    def split(self, tensors: list[Tensor]) -> list[list[Tensor]]:
        """``tensors`` (parallel to the list this grouping was built from), one list per group."""
        if len(self.groups) == 1:
            return [tensors]
        return [[tensors[i] for i in group.index] for group in self.groups]

    def gather(self, parts: list[Tensor]) -> Tensor:
        """Per-group result rows, back in the tensors' order, as float32 on the first tensor's device."""
        device = parts[0].device
        out = torch.cat([p.to(device) for p in parts]) if len(parts) > 1 else parts[0]
        if self._restore is not None:
            out = out[self._restore.to(device)]
        return out.float()


class Layout:
    """How the probe walks one list of gradients (and the parameters they belong to), worked
    out from their devices, shapes and dtypes once and reused every step.

    A layout that no longer fits its tensors (one moved device or changed shape or dtype after
    it was built) makes the probe raise (``torch.stack`` refuses mixed devices or shapes,
    ``_foreach_norm`` a float64 tensor summed in float32) rather than measure wrongly.
    """

    def __init__(self, grads: list[Tensor]) -> None:
        # L2 alone: _foreach_norm's C++ loop costs ~1.5 µs a tensor, so a stack (a copy and a
        # few more ops) pays only for many tensors of one shape.
        self.norms = _Grouping(grads, min_stack=32)
        # Every statistic: several ops per tensor, each a few µs of dispatch, so stacking pays from two.
        self.stats = _Grouping(grads, min_stack=2)
        self.scratch = _Scratch()


class _Scratch:
    """Reused buffers for |g| of CPU tensors read one by one, one per dtype, at most
    ``SCRATCH_ELEMENTS`` long. A fresh ``abs()`` temporary of a large gradient comes as
    fresh pages from the allocator each step; their page faults cost more than the arithmetic."""

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, Tensor] = {}

    def grad_columns(self, g: Tensor, acc: torch.dtype, with_min: bool) -> list[Tensor]:
        """L2 norm, sum, max and (when ``with_min``) min of |g|, as 0-d tensors: ``g`` is read
        once into the buffer, ``SCRATCH_ELEMENTS`` at a time, and each reduction reads the buffer
        while it is in cache."""
        flat = g.reshape(-1)
        size = min(flat.numel(), SCRATCH_ELEMENTS)
        buffer = self._buffers.get(g.dtype)
        if buffer is None or buffer.numel() < size:
            buffer = self._buffers[g.dtype] = torch.empty(size, dtype=g.dtype)
        pieces = []
        for start in range(0, flat.numel(), SCRATCH_ELEMENTS):
            piece = flat[start : start + SCRATCH_ELEMENTS]
            a = torch.abs(piece, out=buffer[: piece.numel()])
            pieces.append([torch.linalg.vector_norm(a, dtype=acc), a.sum(dtype=acc), a.amax(), *([a.amin()] if with_min else [])])
        if len(pieces) == 1:
            return pieces[0]
        l2, l1, high, *low = (torch.stack(column) for column in zip(*pieces))
        return [torch.linalg.vector_norm(l2), l1.sum(), high.amax(), *(m.amin() for m in low)]


def _acc(dtype: torch.dtype) -> torch.dtype:
    # Reduced-precision sums accumulate in float32 (a float16 sum of squares overflows
    # at 65504); float64 keeps its own precision, since narrowing is not allowed.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _wide(tensors: list[Tensor]) -> torch.dtype:
    """The dtype a multi-tensor kernel may accumulate all of ``tensors`` in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _rows(tensors: list[Tensor]) -> Tensor:
    """Same-shape tensors as one new ``[k, numel]`` tensor (a copy that outlives the step)."""
    return torch.stack(tensors).reshape(len(tensors), -1)


def _foreach(tensors: list[Tensor], ord: float, acc: torch.dtype | None = None) -> Tensor:
    return torch.stack(torch._foreach_norm(tensors, ord, dtype=acc or _wide(tensors)))


def _l2(grads: list[Tensor], group: _Group) -> Tensor:
    if group.stacked:
        return torch.linalg.vector_norm(group.rows(grads, "grads"), dim=1, dtype=group.acc)
    return _foreach(grads, 2.0, group.acc)


def _grad_block(grads: list[Tensor], params: list[Tensor], group: _Group, scratch: _Scratch, with_min: bool) -> Tensor:
    """``[k, N_COLUMNS]`` statistics of one group."""
    nan = float("nan")
    if group.stacked:
        rows = group.rows(grads, "grads")
        l2 = torch.linalg.vector_norm(rows, dim=1, dtype=group.acc)
        a = rows.abs_()  # the group's own copy
        weights = group.rows(params, "params")
        cols = [
            l2,
            a.sum(1, dtype=group.acc),
            a.amax(1),
            a.amin(1) if with_min else torch.full_like(a[:, 0], nan),
            torch.linalg.vector_norm(weights, dim=1, dtype=_acc(weights.dtype)),
        ]
    elif not group.on_cpu:
        l2 = _foreach(grads, 2.0, group.acc)
        cols = [
            l2,
            _foreach(grads, 1.0, group.acc),
            _foreach(grads, float("inf"), group.acc),
            _foreach(grads, float("-inf"), group.acc) if with_min else torch.full_like(l2, nan),
            _foreach(params, 2.0),
        ]
    else:
        rows = torch.stack([torch.stack(scratch.grad_columns(g, group.acc, with_min)) for g in grads])
        low = rows[:, 3] if with_min else torch.full_like(rows[:, 0], nan)
        cols = [rows[:, 0], rows[:, 1], rows[:, 2], low, _foreach(params, 2.0)]
    return torch.stack([c.float() for c in cols], dim=1)


@torch.no_grad()
def l2_norms(grads: list[Tensor], layout: Layout) -> Tensor:
    """L2 norm of each gradient, float32 ``[n]``."""
    norms = layout.norms
    return norms.gather([_l2(g, group) for g, group in zip(norms.split(grads), norms.groups)])


@torch.no_grad()
def grad_stats(grads: list[Tensor], params: list[Tensor], layout: Layout, *, with_min: bool = True) -> Tensor:
    """Per-layer statistics as a float32 ``[n, N_COLUMNS]`` matrix on the gradients' device.

    Columns: gradient L2 norm, gradient L1 norm (sum |g|; the host divides by numel
    for mean |g|), max |g|, min |g| (NaN when ``with_min`` is False: it has no
    multi-tensor kernel and is sampled less often), parameter L2 norm.
    """
    stats = layout.stats
    parts = zip(stats.split(grads), stats.split(params), stats.groups)
    return stats.gather([_grad_block(g, p, group, layout.scratch, with_min) for g, p, group in parts])


@torch.no_grad()
def snapshot(params: list[Tensor], layout: Layout) -> list:
    """Copies of the parameters (one per group of ``layout.stats``), taken before a sampled
    step to measure its update."""
    stats = layout.stats
    parts = zip(stats.split(params), stats.groups)
    return [_rows(p) if group.stacked else torch._foreach_mul(p, 1.0) for p, group in parts]


@torch.no_grad()
def update_l1(before: list, after: list[Tensor], layout: Layout) -> Tensor:
    """``[n, 2]`` float32: sum |w_after − w_before| and sum |w_before| per layer.

    Their quotient is DL4J's update:parameter ratio mean|Δw| / mean|w| (numel cancels),
    and sums aggregate exactly when layers are grouped. Consumes ``before`` (a
    :func:`snapshot`, overwritten in place: the copy becomes −Δw).
    """
    stats = layout.stats
    parts = []
    for copy, now, group in zip(before, stats.split(after), stats.groups):
        if group.stacked:
            weight = copy.abs().sum(1, dtype=_acc(copy.dtype))
            delta = copy.sub_(group.rows(now, "params")).abs_().sum(1, dtype=_acc(copy.dtype))
        elif group.on_cpu:
            # One by one, each copy read again while in cache; in place, since a temporary the size
            # of a large parameter can cost more in page faults than its arithmetic.
            weight, delta = [], []
            for c, w in zip(copy, now):
                weight.append(torch.linalg.vector_norm(c, 1, dtype=_acc(c.dtype)))
                delta.append(c.sub_(w).abs_().sum(dtype=_acc(c.dtype)))
            weight, delta = torch.stack(weight), torch.stack(delta)
        else:
            weight = _foreach(copy, 1.0)
            torch._foreach_sub_(copy, now)
            delta = _foreach(copy, 1.0)
        parts.append(torch.stack([delta, weight], dim=1))
    return stats.gather(parts)


@torch.no_grad()
def nonfinite_counts(grads: list[Tensor]) -> Tensor:
    """``[n, 2]`` int64: NaN and ±Inf element counts per layer (run only on the rare skip path)."""
    return torch.stack(
        [torch.stack([torch.isnan(g).sum(), torch.isinf(g).sum()]).to(grads[0].device) for g in grads]
    )
