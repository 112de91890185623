"""What happens around each optimizer step: the guard's decision, sampled statistics, the update ratio.

``before_step`` runs in the optimizer's step pre-hook (after AMP unscaling, before
the update) or, for ``step(closure)``, right after the closure returns (the pre-hook
wraps the closure); ``after_step`` runs in its post-hook. Device work is queued without syncs;
the single host transfer of a step is marked below. Non-finite steps are turned
into no-ops by clearing every gradient: optimizers skip parameters whose ``grad``
is None, so parameters and optimizer state (Adam's moments and step count) stay
bit-identical, and GradScaler's own skip never reaches this code (no double count;
agent/scaler.py counts it when the scaler is given to watch()).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gradwatch.agent import clipping, distributed, probe, sharded, sparse
from gradwatch.agent import params as param_groups
from gradwatch.agent.config import AgentConfig
from gradwatch.agent.commands import CommandRouter
from gradwatch.agent.layers import LayerMap
from gradwatch.agent.loss import loss_tensor
from gradwatch.agent.remedy import Remediation
from gradwatch.agent.sparse import SparseSplit
from gradwatch.agent.spikes import HeldWindow, SpikeGuard
from gradwatch.agent.telemetry import Telemetry
from gradwatch.agent.throttle import Throttled

log = logging.getLogger("gradwatch.agent")

def _norm_dtype(device: torch.device) -> torch.dtype:
    """float64 for the global norm where the device has it (Apple's MPS does not)."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass
class _PendingRatio:
    present: list[int]
    sums: Tensor  # [n, 2] on device, moved to the host with the next transfer
    combined: bool = False  # sharded: the sums of every rank's shards (agent.sharded), no longer this rank's own


class StepMonitor:
    def __init__(
        self,
        params: list[Tensor],
        layer_map: LayerMap,
        telemetry: Telemetry,
        optimizer: torch.optim.Optimizer,
        config: AgentConfig,
        ranks: distributed.RankInfo,
        remedy: Remediation,
        commands: CommandRouter,
        model: torch.nn.Module | None = None,
    ) -> None:
        self.model = model  # for the labels of param groups added after watch()
        self.params = params
        self.layer_map = layer_map
        self.telemetry = telemetry
        self.optimizer = optimizer
        self.config = config
        self.ranks = ranks
        self.remedy = remedy
        self.commands = commands
        self._peer_commands = False
        self._warn = Throttled(log)
        self.spikes = SpikeGuard(config.spike_sigma) if config.guard and config.spike_sigma else None
        self.held = HeldWindow()
        remedy.watch_dtypes({p.dtype for p in params}, params[0].device if params else torch.device("cpu"))
        self.per_layer = ranks.rank == 0 or config.per_layer_ranks == "all"
        self.step = 0
        self._all = list(range(len(params)))
        self._signature = param_groups.signature(optimizer)
        self._loss_sum: Tensor | None = None  # losses observed since the last optimizer step, summed on device
        self._loss_count = 0
        self._evaluations: int | None = None  # closure evaluations in this step; None: not a closure step
        self._split: SparseSplit | None = None  # where sparse gradients sit among the present ones
        self.loss_scale: Callable[[], Tensor | None] | None = None  # GradScaler's current scale, when watched
        self._loss: Tensor | None = None  # the latest optimizer step's loss (mean of its observed values), on device
        self._loss_max: Tensor | None = None  # max since the last transfer, on device
        self._ratio: _PendingRatio | None = None
        self._before: tuple[list[int], probe.Layout, list] | None = None
        self._layout: tuple[list[int], torch.device, probe.Layout] | None = None  # for the present gradients
        self._skipping = False
        self.step_held = False
        self.global_norm = None
        self._min: dict[str, float] = {}  # last measured min |g| per layer
        self._synced_step = 0
        self._calm: tuple[list[int], Tensor] | None = None  # (present, per-tensor norms) of the last calm step
        # FSDP2/DTensor parameters: every rank measures its local shards and joins the same reductions
        # (agent.sharded); None for plain and DDP models.
        self.shards = sharded.build(params, layer_map.tensor_label, ranks, config)

    # -- called by the training thread -------------------------------------------------

    def observe_loss(self, loss: Tensor | float) -> None:
        """Keep the loss on its device; it reaches the host with the next step's transfer. Values
        observed between two optimizer steps (gradient accumulation's micro-batches) are averaged.
        Raises TypeError/ValueError for a loss that is not a real number (Agent.observe logs it)."""
        value, note = loss_tensor(loss)
        if note is not None:
            self._warn.warning("loss_shape", "gradwatch: %s", note)
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_count += 1

    def _close_loss(self) -> None:
        """At an optimizer step (attempted): the mean of the losses observed since the previous one
        becomes the step's loss (one observed value is its own mean, and travels alone)."""
        if self._loss_sum is None:
            return
        value = self._loss_sum if self._loss_count == 1 else self._loss_sum / self._loss_count
        self._loss_sum, self._loss_count = None, 0
        self._loss = value
        self._loss_max = value if self._loss_max is None else torch.fmax(self._loss_max, value)

    def begin_closure_step(self) -> None:
        """``step(closure)`` was called: the gradients come once the closure has run. The LR scale is
        applied now, for optimizers that read the LR before their first evaluation (LBFGS)."""
        self._evaluations = 0
        self.remedy.apply_lr(self.optimizer)

    def closure_evaluated(self) -> None:
        """The step's closure returned (forward and backward done): the first evaluation is guarded
        and measured as a plain step's gradients are; later ones (LBFGS's) are guarded and clipped."""
        self._evaluations += 1
        if self._evaluations == 1:
            self.before_step()
        else:
            self.guard_again()

    def _present(self) -> tuple[list[int], list[Tensor], list[Tensor]]:
        """The watched parameters that have a gradient now: (indices, gradients, parameters)."""
        grads = [g for p in self.params if (g := p.grad) is not None]
        if len(grads) == len(self.params):
            return self._all, grads, self.params
        present = [i for i, p in enumerate(self.params) if p.grad is not None]  # some got no gradient
        return present, grads, [self.params[i] for i in present]

    def _norms(self, grads: list[Tensor], layout: probe.Layout | None) -> Tensor:
        split = self._split
        if split is None:
            return probe.l2_norms(grads, layout)
        dense = probe.l2_norms(split.dense_of(grads), layout) if split.dense else None
        return split.merge(dense, sparse.l2_norms(split.sparse_of(grads)))

    def _stats(self, grads: list[Tensor], params: list[Tensor], layout: probe.Layout | None, with_min: bool) -> Tensor:
        split = self._split
        if split is None:
            return probe.grad_stats(grads, params, layout, with_min=with_min)
        dense = probe.grad_stats(split.dense_of(grads), split.dense_of(params), layout, with_min=with_min) if split.dense else None
        return split.merge(dense, sparse.grad_stats(split.sparse_of(grads), split.sparse_of(params), with_min=with_min))

    def before_step(self) -> None:
        if param_groups.signature(self.optimizer) != self._signature:
            self._rescan()
        self.step += 1
        self._skipping = False
        self.step_held = False  # the guard skipped or clipped this step (no snapshot of it)
        self.global_norm: float | None = None  # this step's, once measured (for the snapshots' own judgement)
        self._before = None
        self._peer_commands = False
        self._close_loss()
        present, grads, params = self._present()
        if self.shards is not None:  # sharded: from here on the local shards (views: clipping acts on them)
            grads, params = sharded.local(grads), sharded.local(params)
        device = grads[0].device if grads else torch.device("cpu")
        commands = self.commands.take()
        sampled = bool(grads) and self.step % self.config.every == 0
        detail = self.step % self.config.detail_every == 0
        remedy = self.remedy
        layout = self._layout_for(present, grads) if grads else None

        whole = self._measure_shards(present, grads, params, layout, len(commands)) if self.shards is not None else None
        if whole is not None:  # sharded: the whole gradient's values, the same on every rank
            stats, norms = (whole.stats if sampled else None), (whole.norms if grads else None)
        else:
            stats = self._stats(grads, params, layout, detail) if sampled and self.per_layer else None
            if stats is not None:
                norms = stats[:, probe.GRAD_NORM]
            elif grads and (sampled or remedy.clipping_active or self.config.guard or self.config.max_grad_norm):
                # The guard's one read of the gradients: their L2 norms, which the spike guard, clipping
                # and the exported global norm need too (on CPU cheaper than a separate NaN/Inf check).
                norms = self._norms(grads, layout)
            else:
                norms = None
        # Non-finite exactly when some tensor's norm is: when one of its elements is, or its sum of
        # squares overflowed (in float64 here, so squaring finite float32 norms cannot overflow).
        global_norm = torch.linalg.vector_norm(norms, dtype=_norm_dtype(norms.device)) if norms is not None else None
        any_bad = None if whole is None else whole.any_bad  # None: this rank decides alone, on the host
        if whole is None and self.ranks.distributed and self.config.sync_ranks:
            local_bad = (~torch.isfinite(global_norm)).float() if global_norm is not None else torch.zeros((), device=device)
            any_bad = self._sync(local_bad, len(commands))
        if self._peer_commands:
            commands = self.commands.broadcast(commands)
        if commands:
            self.commands.apply(commands, self.step)
            if self.commands.rolled_back:  # these gradients belong to the state just abandoned
                self.commands.rolled_back = False
                self._skipping = True
                self._clear_grads()
                self.telemetry.count("skipped", "rollback")
                self.telemetry.update(step=self.step)
                return
        if norms is None:
            self.telemetry.update(step=self.step)
            if whole is not None and whole.n_bad:  # sharded, some rank could not measure: the NaN skip still holds
                self._skip(present, grads, local=bool(whole.local_bad))
                return
            self._clip_and_scale(grads, norms, present)
            return

        zclip = remedy.zclip.threshold() if remedy.zclip is not None else None
        # The head of this step's host transfer: the scalars there are, by name. A loss observed
        # once since the last transfer is its own maximum and travels once. Each op here runs on
        # every step, after the backward pass has left the caches cold (several µs each).
        loss, loss_max = self._loss, self._loss_max
        named = [
            (name, value)
            for name, value in (
                ("global_norm", global_norm),
                ("any_bad", any_bad),
                ("local_bad", whole.local_bad if whole is not None else None),
                ("loss", loss),
                ("loss_max", None if loss_max is loss else loss_max),
                ("clip_threshold", zclip),
                ("loss_scale", self.loss_scale() if self.loss_scale is not None else None),
            )
            if value is not None
        ]
        head = torch.stack([value if value.device == device else value.to(device) for _, value in named])
        extra = []
        if stats is not None:
            extra.append(stats.flatten())
        ratio = self._ratio
        if ratio is not None:
            extra.append(ratio.sums.to(device).flatten())
        flat = torch.cat([head, *extra]) if extra else head
        host = flat if flat.is_cpu else flat.cpu()  # the one host transfer (device sync) of this step
        self._ratio = None
        self._loss_max = None

        values = dict(zip((name for name, _ in named), (host[: len(named)] if extra else host).tolist()))
        offset = len(named)
        updates: dict = {"step": self.step}
        if "loss" in values:
            updates["loss"] = values["loss"]
            self.telemetry.record_peak("loss", values.get("loss_max", values["loss"]))
        if "clip_threshold" in values:
            updates["clip_threshold"] = values["clip_threshold"]
        if "loss_scale" in values:
            updates["loss_scale"] = values["loss_scale"]
        local_bad = bool(values["local_bad"]) if "local_bad" in values else not math.isfinite(values["global_norm"])
        if values.get("any_bad", local_bad):
            self.telemetry.update(**updates)
            self._skip(present, grads, local=local_bad)
            return
        extremes = None  # (largest layer norm, largest |g|) on sampled steps, for the remediation's history
        if stats is not None:
            rows = host[offset : offset + stats.numel()].view(len(present), probe.N_COLUMNS)
            offset += stats.numel()
            # min |g| is measured on detail steps only; other steps show the last measurement
            layers = self.layer_map.fold_stats(present, rows, abs_min=None if detail else self._min)
            if detail:
                self._min = dict(zip(layers, layers.column("grad_abs_min")))
            if self.per_layer:  # sharded: every rank folds the (identical) rows, for the remediation history
                updates["layers"] = layers
            extremes = (max(layers.column("grad_norm")), max(layers.column("grad_abs_max")))
        if ratio is not None and self.per_layer:
            sums = host[offset:].view(len(ratio.present), 2)
            updates["update_ratio"] = self.layer_map.fold_ratio(ratio.present, sums)
        updates["grad_global_norm"] = values["global_norm"]
        self.telemetry.record_peak("grad_global_norm", values["global_norm"])
        if detail and (self.per_layer or self.shards is not None):
            self._snapshot(present, params, layout)
        norms = self._clip_to_max(grads, norms)
        norms = self._hold_spike(grads, norms, values["global_norm"], present, values.get("loss"), extremes)
        self._clip_and_scale(grads, norms, present)
        updates["learning_rates"] = [float(g["lr"]) for g in self.optimizer.param_groups]
        self.telemetry.update(**updates)

    def _clip_to_max(self, grads: list[Tensor], norms: Tensor) -> Tensor:
        """``max_grad_norm``: clip the global norm as clip_grad_norm_ would, after the raw norms were
        measured (and exported). Returns the norms of the clipped gradients, so that clipping after
        it (the spike guard's, the watchdog's) composes: the tightest bound wins."""
        if self.config.max_grad_norm is None:
            return norms
        return clipping.global_norm_(grads, norms, self.config.max_grad_norm)

    def _snapshot(self, present: list[int], params: list[Tensor], layout: probe.Layout) -> None:
        """Copies of the parameters with dense gradients, for this step's update ratio (sparse ones have none)."""
        split = self._split
        if split is not None:
            if not split.dense:
                return
            present, params = split.dense_of(present), split.dense_of(params)
        self._before = (present, layout, probe.snapshot(params, layout))

    def guard_again(self) -> None:
        """A later evaluation of this step's closure (LBFGS's line search): its gradients are guarded
        and clipped too, without statistics. Non-finite ones end the step there: they are cleared, so
        the optimizer sees a zero gradient, and the step counts as skipped."""
        present, grads, _ = self._present()
        if not grads or self._skipping:
            self._clear_grads()
            return
        norms = self._norms(grads, self._layout_for(present, grads))
        bad = (~torch.isfinite(torch.linalg.vector_norm(norms, dtype=_norm_dtype(norms.device)))).float()
        if self.ranks.distributed and self.config.sync_ranks:
            bad = distributed.any_rank(bad)  # every rank evaluates as often (DDP: the same gradients)
        if bool(bad):  # host sync (later evaluations only)
            self._skip(present, grads, local=bool(~torch.isfinite(norms).all()))
            return
        norms = self._clip_to_max(grads, norms)
        if self.remedy.clipping_active:
            self.remedy.clip(grads, norms, self.layer_map.module_unit[present].to(norms.device))

    def _rescan(self) -> None:
        """The optimizer's param groups changed since watch() (``add_param_group``): the new
        parameters are watched, guarded and labelled from this step on."""
        self._signature = param_groups.signature(self.optimizer)
        try:
            params, labels = param_groups.collect(self.model, self.optimizer)
        except ValueError as exc:
            self._warn.warning("rescan", "gradwatch: step %d: the new param groups are not watched: %s", self.step, exc)
            return
        known = {id(p) for p in self.params}
        added = [label for p, label in zip(params, labels) if id(p) not in known]
        self.params = params
        self._all = list(range(len(params)))
        self.layer_map = LayerMap(labels, [p.numel() for p in params], self.config.layers, self.config.top_k)
        self.telemetry.update(depth=self.layer_map.depth())
        # Indices into the old list mean nothing now.
        self._layout = self._split = self._calm = self._ratio = self._before = None
        log.info(
            "gradwatch: step %d: the optimizer has %d param group(s) now; watching %d tensors, %d new: %s",
            self.step + 1, len(self.optimizer.param_groups), len(params), len(added),
            ", ".join(added[:8]) + (", ..." if len(added) > 8 else ""),
        )

    def skipped_by_scaler(self) -> None:
        """GradScaler found Inf/NaN in the scaled gradients and did not call ``optimizer.step()``:
        a step attempted all the same (counted, its losses closed), skipped for ``amp_overflow``."""
        self.step += 1
        self._close_loss()
        self.telemetry.count("skipped", "amp_overflow")
        self.telemetry.update(step=self.step)

    def _hold_spike(
        self, grads: list[Tensor], norms: Tensor, global_norm: float, present: list[int], loss: float | None,
        extremes: tuple[float, float] | None,
    ) -> Tensor:
        """The guard's judgement of a finite step (see spikes.py): a held spike is clipped to the
        bound, an accepted step feeds the remediation's history. Returns the per-tensor norms as
        the step now has them, so remediation clipping after it sees the held gradients (the
        tighter of the two wins)."""
        spikes = self.spikes
        if spikes is not None and self.remedy.clipping_active:
            # Remediation clipping bounds the step now (its `auto` threshold, 2x the accepted median, is
            # below the guard's bound): the guard holds nothing more, and the step feeds no history, so a
            # clipped run cannot ratchet its own bound up nor count the remediation's clips as spikes.
            self.step_held, self.global_norm = False, global_norm
            self._account_held(False)
            return norms
        verdict = "accept" if spikes is None else spikes.judge(global_norm, loss)
        self.step_held, self.global_norm = verdict == "hold", global_norm
        if verdict != "hold":
            if verdict == "regime":
                self.remedy.new_regime(list(spikes.norms))
                self._warn.warning(
                    "regime",
                    "gradwatch: step %d: gradient norm %.3g held for %d steps on a loss that is not rising: "
                    "accepted as the run's new regime (bound now %.3g)",
                    self.step, global_norm, len(spikes.norms), spikes.bound(),
                )
            else:
                self.remedy.observe_healthy(global_norm, *(extremes or (None, None)))
            self._calm = (present, norms)  # a reference to this step's norms, no copy: for the next spike's report
            self._account_held(False)
            return norms
        bound, centre = spikes.bound(), spikes.centre()
        coef = bound / global_norm  # on the host: exact, and no float32 square of a huge norm
        torch._foreach_mul_(grads, coef)
        self.telemetry.count("spike_clipped", "global_norm")
        self.telemetry.record_peak("guard_held_ratio", global_norm / centre if centre else math.inf)
        self._account_held(True)
        layer, rise = self._steepest_rise(present, norms)
        self._warn.warning(
            "spike",
            "gradwatch: step %d: gradient norm %.3g is above the guard's bound (median + %gσ of recent accepted "
            "steps, %.3g; %.3gx their median): clipped to it; most of it in layer %r (%s)",
            self.step, global_norm, spikes.sigma, bound, global_norm / centre if centre else math.inf, layer, rise,
        )
        return norms * coef

    def _account_held(self, held: bool) -> None:
        """The guard's exported state after this step: held share, latest held step, next bound."""
        self.held.add(held)
        updates = {"guard_held_fraction": self.held.fraction}
        if held:
            updates["guard_held_step"] = self.step
        if self.spikes is not None:
            updates["guard_bound"] = self.spikes.bound()
        self.telemetry.update(**updates)

    def _steepest_rise(self, present: list[int], norms: Tensor) -> tuple[str, str]:
        """The layer that carries most of the spike: the largest share of the rise of the squared
        global norm since the last calm step (a ratio would favour small, noisy layers).
        On spike steps only, so its host transfer is not the step's usual one."""
        now = norms.double().cpu().square()  # host sync (spike steps only)
        calm = self._calm
        if calm is None or calm[0] != present:  # no calm step yet, or other tensors had gradients then
            i = int(now.argmax())
            return self.layer_map.tensor_label[present[i]], f"{now[i] / now.sum():.0%} of the squared norm"
        rise = now - calm[1].double().cpu().square()
        i = int(rise.argmax())
        return self.layer_map.tensor_label[present[i]], f"{rise[i] / rise.sum():.0%} of the rise since the last calm step"

    def _clip_and_scale(self, grads: list[Tensor], norms: Tensor | None, present: list[int]) -> None:
        """Remediation for an applied step: clip the (raw-measured) gradients, scale the LR."""
        if grads and norms is not None and self.remedy.clipping_active:
            self.remedy.clip(grads, norms, self.layer_map.module_unit[present].to(norms.device))
        self.remedy.restore_lr(self.optimizer)  # a closure step applied the scale before this step's commands
        self.remedy.apply_lr(self.optimizer)

    def _measure_shards(
        self, present: list[int], grads: list[Tensor], params: list[Tensor], layout: probe.Layout | None, n_commands: int
    ) -> sharded.Combined:
        """Sharded parameters: this step's collectives (the guard's decision and command count ride in them)."""
        pending = self._ratio
        own = None if pending is None or pending.combined else (pending.present, pending.sums)
        whole = self.shards.measure(
            self.step, present, grads, params, layout,
            clipping=self.remedy.clipping_active, n_commands=n_commands, ratio=own,
        )
        if own is not None:
            self._ratio = None if whole.ratio is None else _PendingRatio(pending.present, whole.ratio, combined=True)
        self._peer_commands = whole.n_commands > 0
        return whole

    def _layout_for(self, present: list[int], grads: list[Tensor]) -> probe.Layout | None:
        """The probe's layout for this step's gradients: built again when other parameters
        have gradients, or the model moved to another device. None when every gradient is sparse."""
        if self._layout is not None:
            had, device, layout = self._layout
            if had == present and device == grads[0].device:
                return layout
        self._split = SparseSplit.of(grads)
        dense = grads if self._split is None else self._split.dense_of(grads)
        layout = probe.Layout(dense) if dense else None
        self._layout = (present, grads[0].device, layout)
        return layout

    def _sync(self, local_bad: Tensor, n_commands: int) -> Tensor:
        """Under torch.distributed with sync_ranks, the guard's decision and rank 0's command
        count across ranks: every rank reaches this once per step (one small all-reduce)."""
        self._synced_step = self.step
        flags = torch.stack([local_bad.float(), torch.tensor(float(n_commands), device=local_bad.device)])
        merged = distributed.any_rank(flags)
        self._peer_commands = bool(merged[1] > 0)  # host sync, but the guard's transfer needs it anyway
        return merged[0]

    def recover(self) -> None:
        """After a failure inside before_step: join this step's collective if it was not reached
        (so other ranks do not hang) and skip the step if any rank asked to. The probe's layout is
        built afresh next step, in case it no longer fits the gradients (one changed shape or device)."""
        self._layout = self._split = None
        self.telemetry.update(step=self.step)  # the step was attempted, measured or not
        if self.shards is not None:  # sharded: join what this step's reductions still expect from this rank
            bad, owed_commands = self.shards.recover(self.step, self.remedy.clipping_active)
            if owed_commands:  # rank 0 counted commands in the reduction just joined: receive them too
                self.commands.apply(self.commands.broadcast([]), self.step)
            if bad and not self._skipping:
                self._clear_grads()
                self.telemetry.count("skipped", "nonfinite_peer")
            return
        if self.ranks.distributed and self.config.sync_ranks and self._synced_step != self.step:
            device = next((p.grad.device for p in self.params if p.grad is not None), torch.device("cpu"))
            if self._sync(torch.zeros((), device=device), 0).item():
                self._clear_grads()
                self.telemetry.count("skipped", "nonfinite_peer")

    def after_step(self) -> None:
        if self._evaluations == 0:  # a closure step whose closure never ran: attempted all the same
            self.step += 1
            self.telemetry.update(step=self.step)
        self._evaluations = None
        self.remedy.restore_lr(self.optimizer)
        self.commands.after_step(self.step)
        if self._before is None or self._skipping:
            return
        present, layout, before = self._before
        self._before = None
        after = [self.params[i] for i in present]
        if self.shards is not None:
            after = sharded.local(after)
        self._ratio = _PendingRatio(present, probe.update_l1(before, after, layout))

    # -- the rare path -----------------------------------------------------------------

    def _skip(self, present: list[int], grads: list[Tensor], local: bool) -> None:
        """Turn this optimizer step into a no-op and account for it."""
        self._skipping = self.step_held = True
        self._account_held(True)
        counts = self.layer_map.fold_counts(present, probe.nonfinite_counts(grads).cpu()) if local else {}
        self._clear_grads()
        reason = "nonfinite" if local else "nonfinite_peer"
        self.telemetry.count("skipped", reason)
        for layer, (n_nan, n_inf) in counts.items():
            if n_nan:
                self.telemetry.count("nonfinite", (layer, "nan"), n_nan)
            if n_inf:
                self.telemetry.count("nonfinite", (layer, "inf"), n_inf)
        if local and not counts:  # finite elements whose sum of squares overflowed
            layer = self.layer_map.tensor_label[present[0]]
            self.telemetry.count("nonfinite", (layer, "overflow"))
            counts = {layer: (0, 0)}
        if local:
            first = next(iter(counts))
            n_nan, n_inf = counts[first]
            self._warn.warning(
                "nonfinite",
                "gradwatch: step %d skipped: non-finite gradients, first in layer %r (nan=%d, inf=%d); %d layer(s) affected",
                self.step, first, n_nan, n_inf, len(counts),
            )
        else:
            self._warn.warning("peer", "gradwatch: step %d skipped: another rank had non-finite gradients", self.step)

    def _clear_grads(self) -> None:
        """Every gradient the optimizer would apply, the unwatched empty parameters' included."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def flush(self) -> None:
        """Move a pending observed loss to the host (at close, so the last value is not lost)."""
        self._close_loss()
        if self._loss is not None:
            self.telemetry.update(loss=float(self._loss))
