"""From parameter tensors to bounded `layer` labels, and per-layer values from raw sums.

The probe measures every tensor; this module folds those rows into the exported
layers: one per tensor (default), one per owning module, and optionally only the
top-k by gradient norm plus an ``_other`` aggregate, so a 400-tensor model on 64
ranks does not flood Prometheus. Sums fold exactly (L2 norms via their squares,
mean |g| via L1 and element counts, the update ratio via its two L1 sums).
Runs on the host on sampled steps only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from gradwatch.agent import probe

OTHER = "_other"


class LayerValues(NamedTuple):
    """What one exported layer shows; NaN where not measured (a tuple: a scrape builds hundreds)."""

    grad_norm: float
    grad_abs_mean: float
    grad_abs_max: float
    grad_abs_min: float
    param_norm: float


class LayerTable(Mapping[str, LayerValues]):
    """One sampled step's per-layer values, held as plain rows of floats. Their tuples are made
    on first read, at scrape time: a sampled step of a 400-tensor model would otherwise spend
    about 0.3 ms building 400 of them. Never changed once built (the next step makes a new one),
    so a scrape may read it while training goes on."""

    def __init__(self, rows: dict[str, list[float]]) -> None:
        self._rows = rows
        self._values: dict[str, LayerValues] | None = None

    def __getitem__(self, layer: str) -> LayerValues:
        if self._values is None:
            self._values = {label: LayerValues(*row) for label, row in self._rows.items()}
        return self._values[layer]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def column(self, field: str) -> list[float]:
        """One field (a name of :class:`LayerValues`) of every layer, in the table's order, without tuples."""
        i = LayerValues._fields.index(field)
        return [row[i] for row in self._rows.values()]


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


class LayerMap:
    """Maps tensor index → exported layer label, and folds per-tensor rows into per-layer values."""

    def __init__(self, names: list[str], numels: list[int], grouping: str = "tensor", top_k: int | None = None):
        labels = names if grouping == "tensor" else [module_of(n) for n in names]
        self.labels: list[str] = list(dict.fromkeys(labels))  # model order, unique
        position = {label: i for i, label in enumerate(self.labels)}
        self.tensor_label = labels
        self.group_of = torch.tensor([position[label] for label in labels], dtype=torch.long)
        self.numel = torch.tensor(numels, dtype=torch.float64)
        self.top_k = top_k
        self._kept: set[str] | None = None  # layers shown by the last capped fold_stats
        modules = [module_of(n) for n in names]
        index = {name: i for i, name in enumerate(dict.fromkeys(modules))}
        self.module_unit = torch.tensor([index[m] for m in modules], dtype=torch.long)
        """Each tensor's module index: DL4J's "layer" for the per-layer clipping modes."""

    def depth(self) -> dict[str, int]:
        """Each layer's position in model order (0 nearest the input in most models)."""
        return {label: i for i, label in enumerate(self.labels)}

    def _groups(self, present: list[int]) -> Tensor:
        """Each present tensor's layer index (``present`` lists tensor indices in increasing order)."""
        return self.group_of if len(present) == len(self.group_of) else self.group_of[present]

    def _sum(self, groups: Tensor, columns: list[Tensor]) -> list[Tensor]:
        """Per-layer sums of per-tensor ``columns``, plus one more: each layer's tensor count."""
        rows = torch.stack([*columns, torch.ones_like(columns[0])], 1)
        sums = torch.zeros(len(self.labels), rows.shape[1], dtype=torch.float64).index_add_(0, groups, rows)
        return list(sums.unbind(1))

    def _reduce(self, groups: Tensor, column: Tensor, how: str) -> Tensor:
        init = torch.full((len(self.labels),), float("nan"), dtype=torch.float64)
        return init.scatter_reduce_(0, groups, column, reduce=how, include_self=False)

    def fold_stats(
        self, present: list[int], stats: Tensor, abs_min: dict[str, float] | None = None
    ) -> LayerTable:
        """Per-layer values from probe rows (``stats[k]`` belongs to tensor ``present[k]``), host CPU.

        ``abs_min``: the min |g| to show per layer instead of the ``stats`` column, on steps
        that do not measure it.
        """
        s = stats.to(torch.float64)
        groups = self._groups(present)
        numel = self.numel if len(present) == len(self.numel) else self.numel[present]
        gsq, l1, n, psq, count = self._sum(
            groups, [s[:, probe.GRAD_NORM] ** 2, s[:, probe.GRAD_L1], numel, s[:, probe.PARAM_NORM] ** 2]
        )
        sums = {"gsq": gsq, "l1": l1, "numel": n, "psq": psq}
        sums["gmax"] = self._reduce(groups, s[:, probe.GRAD_ABS_MAX], "amax")
        if abs_min is None:
            sums["gmin"] = self._reduce(groups, s[:, probe.GRAD_ABS_MIN], "amin")
        else:
            sums["gmin"] = torch.tensor([abs_min.get(label, math.nan) for label in self.labels], dtype=torch.float64)
        has = (count > 0).tolist()
        shown = [i for i in range(len(self.labels)) if has[i]]
        if self.top_k is not None and len(shown) > self.top_k:
            shown = sorted(shown, key=lambda i: -float(sums["gsq"][i]))[: self.top_k]
            rest = torch.tensor([i for i in range(len(self.labels)) if has[i] and i not in set(shown)])
            self._kept = {self.labels[i] for i in shown}
            o = {k: v[rest] for k, v in sums.items()}
            extra = {
                OTHER: [
                    float(o["gsq"].sum().sqrt()),
                    float(o["l1"].sum() / o["numel"].sum()),
                    float(o["gmax"].max()),
                    float(o["gmin"].min()) if abs_min is None else abs_min.get(OTHER, math.nan),
                    float(o["psq"].sum().sqrt()),
                ]
            }
        else:
            self._kept = None
            extra = {}
        columns = torch.stack([sums["gsq"].sqrt(), sums["l1"] / sums["numel"], sums["gmax"], sums["gmin"], sums["psq"].sqrt()], 1)
        rows = columns.tolist()
        return LayerTable({self.labels[i]: rows[i] for i in shown} | extra)

    def fold_ratio(self, present: list[int], sums: Tensor) -> dict[str, float]:
        """Per-layer update ratio sum|Δw| / sum|w| from probe.update_l1 rows (same layers as the last fold_stats)."""
        s = sums.to(torch.float64)
        delta, weight, count = self._sum(self._groups(present), [s[:, 0], s[:, 1]])
        has = (count > 0).tolist()
        ratio = (delta / weight).tolist()
        out = {label: ratio[i] for i, label in enumerate(self.labels) if has[i]}
        kept = self._kept
        if kept is None:
            return out
        rest = torch.tensor([i for i, label in enumerate(self.labels) if has[i] and label not in kept])
        return {k: v for k, v in out.items() if k in kept} | {OTHER: float(delta[rest].sum() / weight[rest].sum())}

    def fold_counts(self, present: list[int], counts: Tensor) -> dict[str, tuple[int, int]]:
        """Per-layer (NaN, Inf) element counts, only layers that have any (never capped: rare events)."""
        nan, inf, _ = self._sum(self._groups(present), list(counts.to(torch.float64).unbind(1)))
        nan, inf = nan.tolist(), inf.tolist()
        return {label: (int(nan[i]), int(inf[i])) for i, label in enumerate(self.labels) if nan[i] or inf[i]}



WRAPPER_ATTRIBUTES = frozenset(
    {
        "_orig_mod",  # torch.compile's OptimizedModule
        "_fsdp_wrapped_module",  # FSDP (1)
        "_checkpoint_wrapped_module",  # activation checkpointing's CheckpointWrapper
        "_forward_module",  # Lightning's module wrappers and Fabric's _FabricModule
        "_original_module",
    }
)
"""Submodule names that only wrappers use: a parameter's label never contains them."""

_DATA_PARALLEL = frozenset({"DistributedDataParallel", "DataParallel", "DeepSpeedEngine"})
"""Wrappers that hold the model as ``.module``; only under these is ``module`` dropped (a user's own
submodule may well be called ``module``)."""


def canonical_names(model: torch.nn.Module) -> dict[int, str]:
    """Each parameter's name as the unwrapped model would give it, by ``id``: the same model has the
    same `layer` labels under DDP (``module.``), torch.compile (``_orig_mod.``), FSDP and activation
    checkpointing wrappers (``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``).
    A parameter reachable by several paths keeps its first one, as ``named_parameters()`` does."""
    names: dict[int, str] = {}
    seen: set[int] = set()

    def visit(module: torch.nn.Module, prefix: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        for name, p in module.named_parameters(recurse=False):
            names.setdefault(id(p), prefix + name)
        parallel = any(c.__name__ in _DATA_PARALLEL for c in type(module).__mro__)
        for name, child in module.named_children():
            transparent = name in WRAPPER_ATTRIBUTES or (name == "module" and parallel)
            visit(child, prefix if transparent else f"{prefix}{name}.")

    visit(model, "")
    return names
