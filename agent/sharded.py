"""Statistics of sharded parameters (FSDP2 ``fully_shard``, DTensor): each rank measures its own
local shards and the ranks combine them, so every rank holds the values of the whole gradient.

Squared L2 norms and L1 sums add up across shards, maxima combine by a max (and minima as the max
of their negatives). An element of a tensor held by r ranks (a ``Replicate`` mesh dimension, as in
HSDP, or a plain tensor every rank holds) is counted r times, so its sums are divided by r
(FIELD_NOTES §5). A norm called on a DTensor would run collectives of its own on whichever ranks
call it; here only local tensors (``to_local()``) are read and every collective is explicit.

The collectives of one optimizer step, issued by every rank in this order whatever its rank or
data (their sizes follow from the step number and the settings alone, so they always match):

1. every step, one all-reduce SUM of float64: the number of ranks whose shards hold a NaN/Inf,
   rank 0's command count, the number of ranks whose measurement failed, per-tensor squared gradient norms (when the guard, clipping or sampling
   needs them); on sampled steps also per-tensor L1 sums and squared parameter norms; on the step
   after a detail step the update ratio's two L1 sums per tensor and the number of ranks that
   measured them;
2. on sampled steps, one all-reduce MAX: per-tensor max |g| and, on detail steps, −min |g|;
3. only when rank 0 brought commands, their broadcast (agent.commands).

Ranks that do not export per-layer detail measure it all the same and join every reduction, so
the guard, clipping and the remediation history see the same numbers on every rank.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from gradwatch.agent import probe
from gradwatch.agent.config import AgentConfig
from gradwatch.agent.distributed import RankInfo
from gradwatch.agent.throttle import Throttled

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support: nothing can be sharded
    DTensor = None

log = logging.getLogger("gradwatch.agent")


def is_sharded(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


@torch.no_grad()  # to_local() under autograd costs ~30x more (an autograd Function per call)
def local(tensors: list[Tensor]) -> list[Tensor]:
    """Each DTensor's local shard (a view: in-place clipping of it changes the gradient); plain tensors as they are."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def copies(t: Tensor, world: int, label: str) -> int:
    """How many ranks hold each element of ``t``: the world size over its number of distinct shards."""
    if not is_sharded(t):
        return world
    mesh, placements = t.device_mesh, t.placements
    if mesh.size() != world:
        raise ValueError(
            f"gradwatch.watch: parameter {label!r} is sharded over {mesh.size()} of {world} ranks; gradwatch "
            "combines statistics over the whole job, so it needs meshes that span every rank"
        )
    if any(p.is_partial() for p in placements):
        raise ValueError(f"gradwatch.watch: parameter {label!r} has a Partial placement; its values cannot be measured")
    return world // math.prod(mesh.size(d) for d, p in enumerate(placements) if p.is_shard())


@dataclass(frozen=True)
class _Plan:
    """Which parts this step's reductions carry: the same on every rank at the same step."""

    norms: bool
    sampled: bool
    detail: bool
    ratio: bool

    def sizes(self, n: int) -> tuple[int, int]:
        """Lengths of the SUM and MAX vectors for ``n`` watched tensors."""
        return 3 + self.ratio + n * (self.norms + 2 * self.sampled + 2 * self.ratio), n * (self.sampled + self.detail)


@dataclass
class Combined:
    """One step's values of the whole gradient, identical on every rank (device tensors unless noted)."""

    norms: Tensor | None  # [len(present)] float32 L2 norm of each tensor's gradient; None when some rank failed
    stats: Tensor | None  # [len(present), probe.N_COLUMNS] float32, sampled steps; None when some rank failed
    any_bad: Tensor  # 0-d: 1.0 when some rank's shards hold a NaN/Inf
    local_bad: Tensor  # 0-d: 1.0 when this rank's own shards do
    n_commands: int  # rank 0's command count (host)
    n_bad: int  # ranks whose shards hold a NaN/Inf (host)
    ratio: Tensor | None  # [len(ratio_present), 2] update-ratio sums; None unless every rank measured them


class Shards:
    """The per-step measurement of a model with sharded parameters (built by :func:`build`)."""

    def __init__(self, params: list[Tensor], labels: list[str], ranks: RankInfo, config: AgentConfig) -> None:
        self.n = len(params)
        self.world = ranks.world_size
        self.every, self.detail_every, self.guard = config.every, config.detail_every, config.guard
        self.labels = labels
        self.params = params
        self._copies = torch.tensor([copies(p, self.world, label) for p, label in zip(params, labels)], dtype=torch.float64)
        self._on: dict[torch.device, Tensor] = {}  # _copies on each device used
        self._grads_checked = False
        self._reduced_step = -1
        self._total: Tensor | None = None  # the latest SUM vector, for recover()
        self._warn = Throttled(log)
        # NCCL reduces only CUDA tensors: with CPU-offloaded parameters (FSDP2's CPUOffloadPolicy) the
        # vectors travel through the current CUDA device for their collectives.
        nccl = self.world > 1 and dist.get_backend() == "nccl"
        self._comm = torch.device("cuda", torch.cuda.current_device()) if nccl else None
        if not config.sync_ranks:
            log.warning("gradwatch: sync_ranks=False has no effect with sharded parameters: their statistics need the ranks combined")
        self._check_same_parameters()

    def _check_same_parameters(self) -> None:
        """One collective at attach: every rank must watch the same tensors, or the per-step
        reductions would not line up (a pipeline stage's parameters, another rank's optimizer)."""
        if self.world == 1:
            return
        shape = [float(self.n), float(sum(p.numel() for p in self.params))]
        mine = torch.tensor(shape + [-v for v in shape], dtype=torch.float64, device=self._comm or self._device())
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        high, low = mine[:2].tolist(), (-mine[2:]).tolist()
        if high != low:
            raise ValueError(
                f"gradwatch.watch: ranks watch different parameters (between {low[0]:.0f} and {high[0]:.0f} tensors, "
                f"{low[1]:.0f} to {high[1]:.0f} elements); with sharded parameters every rank must watch the same model"
            )

    def _device(self) -> torch.device:
        return self.params[0].device

    def plan(self, step: int, clipping: bool) -> _Plan:
        sampled = step % self.every == 0
        return _Plan(
            norms=sampled or clipping or self.guard,
            sampled=sampled,
            detail=sampled and step % self.detail_every == 0,
            ratio=step > 1 and (step - 1) % self.detail_every == 0,
        )

    def _copies_on(self, device: torch.device) -> Tensor:
        c = self._on.get(device)
        if c is None:
            c = self._on[device] = self._copies.to(device)
        return c

    def _full(self, present: Tensor | None, values: Tensor, fill: float = 0.0) -> Tensor:
        """Per-present-tensor ``values`` as a vector over every watched tensor, ``fill`` elsewhere."""
        values = values.double()
        if present is None:
            return values
        return torch.full((self.n,), fill, dtype=torch.float64, device=values.device).index_copy_(0, present, values)

    def _index(self, present: list[int], device: torch.device) -> Tensor | None:
        return None if len(present) == self.n else torch.tensor(present, dtype=torch.long, device=device)

    @torch.no_grad()
    def measure(
        self,
        step: int,
        present: list[int],
        grads: list[Tensor],
        params: list[Tensor],
        layout: probe.Layout | None,
        *,
        clipping: bool,
        n_commands: int,
        ratio: tuple[list[int], Tensor] | None,
    ) -> Combined:
        """This step's statistics of the whole gradient. ``grads``/``params``: the local shards of
        the tensors ``present`` lists; ``ratio``: this rank's update-ratio sums of the last detail step."""
        plan = self.plan(step, clipping)
        if not self._grads_checked and grads:
            self._check_grad_placements(present)
        device = grads[0].device if grads else self._device()
        held = self._copies_on(device)
        where = self._index(present, device)
        zeros = torch.zeros(self.n, dtype=torch.float64, device=device)
        blocks: list[Tensor] = []
        highs: list[Tensor] = []
        local_bad = torch.zeros((), dtype=torch.float64, device=device)
        if plan.norms:
            sq = self._full(where, probe.l2_norms(grads, layout).double().square()) if grads else zeros
            local_bad = (~torch.isfinite(sq.sum())).double()
            blocks.append(sq / held)
        if plan.sampled:
            if grads:
                high, low = self._extremes(grads, plan.detail)
                blocks += [self._full(where, _norms(grads, 1.0)) / held, self._full(where, _norms(params, 2.0).double().square()) / held]
                highs.append(self._full(where, high, -math.inf))
                if low is not None:
                    highs.append(self._full(where, -low, -math.inf))
            else:
                blocks += [zeros, zeros]
                highs += [torch.full((self.n,), -math.inf, dtype=torch.float64, device=device)] * (1 + plan.detail)
        n_ratio = 0.0
        if plan.ratio:
            if ratio is not None:
                at = self._index(ratio[0], device)
                sums = ratio[1].to(device)
                blocks += [self._full(at, sums[:, 0]) / held, self._full(at, sums[:, 1]) / held]
                n_ratio = 1.0
            else:
                blocks += [zeros, zeros]
        head = torch.tensor([0.0, float(n_commands), 0.0, n_ratio][: 3 + plan.ratio], dtype=torch.float64, device=device)
        head[0] = local_bad
        total = torch.cat([head, *blocks])
        high = torch.cat(highs) if highs else None
        self._reduce(step, total, high)
        return self._unpack(plan, total, high, where, local_bad, ratio)

    def _check_grad_placements(self, present: list[int]) -> None:
        """Once, at the first step with gradients: the replication counts come from the parameters'
        placements, which FSDP2 gives their gradients too; a gradient placed otherwise gets its own."""
        self._grads_checked = True
        for i in present:
            p = self.params[i]
            g = p.grad
            if not is_sharded(g) or (is_sharded(p) and g.placements == p.placements):
                continue
            if any(placement.is_partial() for placement in g.placements):
                log.warning(
                    "gradwatch: the gradient of %r is Partial (not yet reduced across ranks): its statistics are not exact",
                    self.labels[i],
                )
                continue
            self._copies[i] = copies(g, self.world, self.labels[i])
            self._on.clear()

    def _extremes(self, grads: list[Tensor], with_min: bool) -> tuple[Tensor, Tensor | None]:
        """max |g| and min |g| of each local shard; an empty shard (a small tensor split over more
        ranks than it has rows) gives max 0 and min +inf, which change nothing when combined."""
        full = [i for i, g in enumerate(grads) if g.numel()]
        kept = grads if len(full) == len(grads) else [grads[i] for i in full]
        device = grads[0].device
        high = torch.zeros(len(grads), dtype=torch.float64, device=device)
        low = torch.full((len(grads),), math.inf, dtype=torch.float64, device=device) if with_min else None
        if kept:
            at = torch.tensor(full, device=device)
            high.index_copy_(0, at, _norms(kept, math.inf).double())
            if low is not None:
                low.index_copy_(0, at, _norms(kept, -math.inf).double())
        return high, low

    def _reduce(self, step: int, total: Tensor, high: Tensor | None) -> None:
        """The step's collectives (every rank, this order)."""
        if self.world > 1:
            for vector, op in ((total, dist.ReduceOp.SUM), (high, dist.ReduceOp.MAX)):
                if vector is None:
                    continue
                moved = vector if self._comm is None or vector.device == self._comm else vector.to(self._comm)
                dist.all_reduce(moved, op=op)
                if moved is not vector:
                    vector.copy_(moved)
        self._reduced_step, self._total = step, total

    def _unpack(
        self, plan: _Plan, total: Tensor, high: Tensor | None, where: Tensor | None, local_bad: Tensor, ratio
    ) -> Combined:
        n = self.n
        # Host sync: the command count decides whether a broadcast follows (the guard's transfer needs the values anyway).
        head = total[: 3 + plan.ratio].tolist()
        n_bad, n_commands, n_failed = int(head[0]), int(head[1]), int(head[2])
        any_bad = (total[0] > 0).float()
        if n_failed:
            # That rank's shards are missing from the sums: no values this step, and so no clipping on
            # any rank (HSDP replicas stay identical); a NaN found by the others still skips the step.
            self._warn.warning(
                "failed", "gradwatch: %d rank(s) could not measure their shards: this step goes unmeasured and unclipped on every rank", n_failed
            )
            return Combined(None, None, any_bad, local_bad.float(), n_commands, n_bad, None)
        blocks = total[3 + plan.ratio :].view(-1, n)
        pick = (lambda v: v) if where is None else (lambda v: v[where])
        row = 0
        norms = stats = None
        if plan.norms:
            l2 = pick(blocks[row]).sqrt()
            norms = l2.float()
            row += 1
        if plan.sampled:
            l1, psq = pick(blocks[row]), pick(blocks[row + 1])
            row += 2
            highs = high.view(-1, n)
            low = -pick(highs[1]) if plan.detail else torch.full_like(l1, math.nan)
            stats = torch.stack([l2, l1, pick(highs[0]), low, psq.sqrt()], 1).float()
        combined_ratio = None
        if plan.ratio and ratio is not None and head[3] == self.world:
            at = ratio[0]
            sums = torch.stack([blocks[row], blocks[row + 1]], 1)
            combined_ratio = sums if len(at) == n else sums[torch.tensor(at, device=sums.device)]
        elif plan.ratio and ratio is not None:
            self._warn.warning("ratio", "gradwatch: update ratio not exported: %d of %d ranks measured it", int(head[3]), self.world)
        return Combined(norms, stats, any_bad, local_bad.float(), n_commands, n_bad, combined_ratio)

    @torch.no_grad()
    def recover(self, step: int, clipping: bool) -> tuple[bool, int]:
        """After a failure inside this step's monitoring on this rank: join the reductions the other
        ranks are in, if this rank had not reached them: counted as failed, with values that change
        nothing (zeros for sums, −inf for maxima). Returns whether some rank found a NaN/Inf (this rank then skips
        with them) and the command count of a reduction joined here (its broadcast follows)."""
        if self._reduced_step == step:
            return bool(self._total[0] > 0), 0
        plan = self.plan(step, clipping)
        n_sum, n_high = plan.sizes(self.n)
        device = self._device()
        total = torch.zeros(n_sum, dtype=torch.float64, device=device)
        total[2] = 1.0  # this rank failed
        high = torch.full((n_high,), -math.inf, dtype=torch.float64, device=device) if plan.sampled else None
        self._reduce(step, total, high)
        return bool(total[0] > 0), int(total[1])


def _norms(tensors: list[Tensor], ord: float) -> Tensor:
    return torch.stack(torch._foreach_norm(tensors, ord, dtype=probe._wide(tensors)))


def build(params: list[Tensor], labels: list[str], ranks: RankInfo, config: AgentConfig) -> Shards | None:
    """A :class:`Shards` when some watched parameter is a DTensor (then ``watch()`` is a collective:
    every rank calls it), else None: plain and DDP models keep the per-rank path."""
    if not any(is_sharded(p) for p in params):
        return None
    return Shards(params, labels, ranks, config)
