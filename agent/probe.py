"""Per-layer gradient statistics: pure tensor math, no host synchronisation.

Every function takes lists of tensors (one per layer) and returns float32 tensors
on the same device, under ``torch.no_grad()``. Nothing here calls ``.item()``,
logs or touches Prometheus: the agent moves the results to the host once per
sampled step (see ``agent.monitor``).

Kernel choice (measured by ``benchmarks/``, FIELD_NOTES §2): on CUDA the
multi-tensor ``torch._foreach_norm`` kernels cover L2, L1 and max in a few
launches. On CPU ``_foreach_norm`` with ord=1 or ord=inf is 3–12× slower than
ord=2, while one ``abs`` per tensor followed by ``sum``/``amax`` reads each
gradient about as fast as the L2 kernel, so the CPU path loops per tensor
(no sync is involved on CPU either way).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Columns of the matrix returned by grad_stats, in order.
GRAD_NORM, GRAD_L1, GRAD_ABS_MAX, GRAD_ABS_MIN, PARAM_NORM = range(5)
N_COLUMNS = 5


def _per_device(fn, *lists: list[Tensor]) -> Tensor:
    """Run ``fn`` on each same-device slice of the parallel ``lists`` (multi-tensor kernels
    need one device); rows come back in input order on the first tensor's device."""
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(lists[0]):
        groups.setdefault(t.device, []).append(i)
    if len(groups) == 1:
        return fn(*lists)
    device = lists[0][0].device
    parts = [(idx, fn(*[[lst[i] for i in idx] for lst in lists]).to(device)) for idx in groups.values()]
    out = torch.empty((len(lists[0]), *parts[0][1].shape[1:]), dtype=torch.float32, device=device)
    for idx, block in parts:
        out[torch.tensor(idx, device=device)] = block
    return out


def _norms(tensors: list[Tensor], ord: float) -> Tensor:
    # Reduced-precision norms accumulate in float32 (a float16 sum of squares overflows
    # at 65504); float64 keeps its own precision, since narrowing is not allowed.
    wide = any(t.dtype == torch.float64 for t in tensors)
    return torch.stack(torch._foreach_norm(tensors, ord, dtype=None if wide else torch.float32)).float()


def _abs_sum_max_min(tensors: list[Tensor], with_min: bool) -> Tensor:
    nan = float("nan")
    if tensors[0].is_cuda:
        cols = [_norms(tensors, 1.0), _norms(tensors, float("inf"))]
        cols.append(_norms(tensors, float("-inf")) if with_min else torch.full_like(cols[0], nan))
        return torch.stack(cols, dim=1)
    rows = []
    for t in tensors:
        a = t.abs()
        if with_min:
            lo, hi = torch.aminmax(a)
        else:
            lo, hi = torch.tensor(nan), a.amax()
        rows.append(torch.stack([a.sum(dtype=torch.float32), hi.float(), lo.float()]))
    return torch.stack(rows)


def _stats_block(grads: list[Tensor], params: list[Tensor], with_min: bool) -> Tensor:
    return torch.cat(
        [_norms(grads, 2.0).unsqueeze(1), _abs_sum_max_min(grads, with_min), _norms(params, 2.0).unsqueeze(1)], dim=1
    )


@torch.no_grad()
def l2_norms(tensors: list[Tensor]) -> Tensor:
    """L2 norm of each tensor, float32 ``[n]`` (one multi-tensor kernel per device)."""
    return _per_device(lambda ts: _norms(ts, 2.0), tensors)


@torch.no_grad()
def grad_stats(grads: list[Tensor], params: list[Tensor], *, with_min: bool = True) -> Tensor:
    """Per-layer statistics as a float32 ``[n, N_COLUMNS]`` matrix on the gradients' device.

    Columns: gradient L2 norm, gradient L1 norm (sum |g|; the host divides by numel
    for mean |g|), max |g|, min |g| (NaN when ``with_min`` is False: it has no
    multi-tensor kernel and is sampled less often), parameter L2 norm.
    """
    return _per_device(lambda g, p: _stats_block(g, p, with_min), grads, [p.detach() for p in params])


@torch.no_grad()
def snapshot(params: list[Tensor]) -> list[Tensor]:
    """Copies of the parameters, taken before a sampled step to measure its update."""
    return torch._foreach_mul([p.detach() for p in params], 1.0)


@torch.no_grad()
def update_l1(before: list[Tensor], after: list[Tensor]) -> Tensor:
    """``[n, 2]`` float32: sum |w_after − w_before| and sum |w_before| per layer.

    Their quotient is DL4J's update:parameter ratio mean|Δw| / mean|w| (numel cancels),
    and sums aggregate exactly when layers are grouped. Consumes ``before`` (overwritten).
    """
    weight = _per_device(lambda b: _norms(b, 1.0), before)
    torch._foreach_sub_(before, [a.detach() for a in after])  # in place: the copy becomes -Δw, no new buffers
    return torch.stack([_per_device(lambda d: _norms(d, 1.0), before), weight], dim=1)


@torch.no_grad()
def nonfinite_flag(grads: list[Tensor]) -> Tensor:
    """0-d float32 tensor: 1.0 if any gradient element is NaN or ±Inf, else 0.0.

    Uses the fused kernel ``GradScaler`` uses, with an unscale factor of exactly 1.0
    (which leaves every finite value bit-identical). It reads each gradient once
    and is cheaper than an L2-norm pass, so it can run on every step.
    """
    found = torch.zeros(1, dtype=torch.float32, device=grads[0].device)
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for (dev, _), group in groups.items():
        local = torch.zeros(1, dtype=torch.float32, device=dev)
        torch._amp_foreach_non_finite_check_and_unscale_(group, local, torch.ones(1, device=dev))
        found = torch.maximum(found, local.to(found.device))
    return found[0]


@torch.no_grad()
def nonfinite_counts(grads: list[Tensor]) -> Tensor:
    """``[n, 2]`` int64: NaN and ±Inf element counts per layer (run only on the rare skip path)."""
    return torch.stack(
        [torch.stack([torch.isnan(g).sum(), torch.isinf(g).sum()]).to(grads[0].device) for g in grads]
    )
