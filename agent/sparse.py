"""Sparse gradients (``Embedding(sparse=True)``, SparseAdam): guarded and measured apart from the dense ones.

The probe's multi-tensor kernels take dense tensors only (``_foreach_norm`` and ``clip_grad_norm_``
refuse a sparse COO tensor), so a step's sparse gradients are read here, one by one, from their
coalesced values: the L2 norm, sum |g| and max |g| of the values equal the dense gradient's (the
elements not stored are zeros); min |g| is 0 unless every element is stored. A NaN or Inf among the
values makes the norm non-finite, so the guard sees it as in a dense gradient. Coalescing sorts the
stored indices, a copy the size of the values (SparseAdam coalesces the same gradient again).
Scaling (clipping) works on the sparse tensor itself: ``_foreach_mul_`` accepts it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradwatch.agent import probe


class SparseSplit:
    """Where the sparse gradients sit in one step's list of present gradients, and the way back to
    that list's order for rows computed dense-first. Built with the probe's layout (when other
    parameters have gradients): which parameters get sparse gradients does not change step to step."""

    def __init__(self, grads: list[Tensor]) -> None:
        self.sparse = [k for k, g in enumerate(grads) if g.is_sparse]
        self.dense = [k for k, g in enumerate(grads) if not g.is_sparse]
        self._restore = torch.argsort(torch.tensor(self.dense + self.sparse))

    @classmethod
    def of(cls, grads: list[Tensor]) -> SparseSplit | None:
        """None when every gradient is dense (the common case: nothing changes for it)."""
        return cls(grads) if any(g.is_sparse for g in grads) else None

    def dense_of(self, items: list) -> list:
        return [items[k] for k in self.dense]

    def sparse_of(self, items: list) -> list:
        return [items[k] for k in self.sparse]

    def merge(self, dense_rows: Tensor | None, sparse_rows: Tensor) -> Tensor:
        """Dense rows then sparse rows, back in the present gradients' order."""
        rows = sparse_rows if dense_rows is None else torch.cat([dense_rows, sparse_rows.to(dense_rows.device)])
        return rows[self._restore.to(rows.device)]


@torch.no_grad()
def l2_norms(grads: list[Tensor]) -> Tensor:
    """L2 norm of each sparse gradient, float32 ``[k]``."""
    return torch.stack([torch.linalg.vector_norm(g.coalesce().values(), dtype=torch.float32) for g in grads])


@torch.no_grad()
def grad_stats(grads: list[Tensor], params: list[Tensor], *, with_min: bool = True) -> Tensor:
    """The probe's ``[k, N_COLUMNS]`` statistics of sparse gradients, same columns and units."""
    rows = []
    for g, p in zip(grads, params):
        values = g.coalesce().values()
        a = values.abs()
        zero = torch.zeros((), dtype=torch.float32, device=values.device)
        high = a.amax().float() if a.numel() else zero
        if not with_min:
            low = torch.full_like(zero, float("nan"))
        else:
            low = a.amin().float() if a.numel() == p.numel() else zero  # some elements are not stored: zeros
        columns = [None] * probe.N_COLUMNS
        columns[probe.GRAD_NORM] = torch.linalg.vector_norm(values, dtype=torch.float32)
        columns[probe.GRAD_L1] = a.sum(dtype=torch.float32)
        columns[probe.GRAD_ABS_MAX] = high
        columns[probe.GRAD_ABS_MIN] = low
        columns[probe.PARAM_NORM] = torch.linalg.vector_norm(p.detach(), dtype=torch.float32).to(values.device)
        rows.append(torch.stack(columns))
    return torch.stack(rows)
