"""What happens around each optimizer step: the guard's decision, sampled statistics, the update ratio.

``before_step`` runs in the optimizer's step pre-hook (after AMP unscaling, before
the update), ``after_step`` in its post-hook. Device work is queued without syncs;
the single host transfer of a step is marked below. Non-finite steps are turned
into no-ops by clearing every gradient: optimizers skip parameters whose ``grad``
is None, so parameters and optimizer state (Adam's moments and step count) stay
bit-identical, and GradScaler's own skip never reaches this code (no double count).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gradwatch.agent import clipping, distributed, probe
from gradwatch.agent.config import AgentConfig
from gradwatch.agent.commands import CommandRouter
from gradwatch.agent.layers import LayerMap
from gradwatch.agent.remedy import Remediation
from gradwatch.agent.spikes import SpikeGuard
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
    ) -> None:
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
        self.per_layer = ranks.rank == 0 or config.per_layer_ranks == "all"
        self.step = 0
        self._all = list(range(len(params)))
        self._loss: Tensor | None = None  # latest observed loss, on device
        self._loss_max: Tensor | None = None  # max since the last transfer, on device
        self._ratio: _PendingRatio | None = None
        self._before: tuple[list[int], probe.Layout, list] | None = None
        self._layout: tuple[list[int], torch.device, probe.Layout] | None = None  # for the present gradients
        self._skipping = False
        self.held = False
        self.global_norm = None
        self._min: dict[str, float] = {}  # last measured min |g| per layer
        self._synced_step = 0
        self._calm: tuple[list[int], Tensor] | None = None  # (present, per-tensor norms) of the last calm step

    # -- called by the training thread -------------------------------------------------

    def observe_loss(self, loss: Tensor | float) -> None:
        """Keep the loss on its device; it reaches the host with the next step's transfer."""
        if isinstance(loss, Tensor):  # each op skipped here is one fewer on every step
            value = loss.detach()
            value = value if value.dtype == torch.float32 else value.float()
            value = value if value.dim() == 0 else value.reshape(())
        else:
            value = torch.tensor(float(loss))
        self._loss = value
        self._loss_max = value if self._loss_max is None else torch.fmax(self._loss_max, value)

    def before_step(self) -> None:
        self.step += 1
        self._skipping = False
        self.held = False  # the guard skipped or clipped this step (no snapshot of it)
        self.global_norm: float | None = None  # this step's, once measured (for the snapshots' own judgement)
        self._before = None
        self._peer_commands = False
        grads = [g for p in self.params if (g := p.grad) is not None]
        if len(grads) == len(self.params):
            present, params = self._all, self.params
        else:  # some got no gradient
            present = [i for i, p in enumerate(self.params) if p.grad is not None]
            params = [self.params[i] for i in present]
        device = grads[0].device if grads else torch.device("cpu")
        commands = self.commands.take()
        sampled = bool(grads) and self.step % self.config.every == 0
        detail = self.step % self.config.detail_every == 0
        remedy = self.remedy
        layout = self._layout_for(present, grads) if grads else None

        stats = probe.grad_stats(grads, params, layout, with_min=detail) if sampled and self.per_layer else None
        if stats is not None:
            norms = stats[:, probe.GRAD_NORM]
        elif grads and (sampled or remedy.clipping_active or self.config.guard):
            # The guard's one read of the gradients: their L2 norms, which the spike guard, clipping
            # and the exported global norm need too (on CPU cheaper than a separate NaN/Inf check).
            norms = probe.l2_norms(grads, layout)
        else:
            norms = None
        # Non-finite exactly when some tensor's norm is: when one of its elements is, or its sum of
        # squares overflowed (in float64 here, so squaring finite float32 norms cannot overflow).
        global_norm = torch.linalg.vector_norm(norms, dtype=_norm_dtype(norms.device)) if norms is not None else None
        any_bad = None  # None: this rank decides alone, on the host
        if self.ranks.distributed and self.config.sync_ranks:
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
                ("loss", loss),
                ("loss_max", None if loss_max is loss else loss_max),
                ("clip_threshold", zclip),
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
        local_bad = not math.isfinite(values["global_norm"])
        if values.get("any_bad", local_bad):
            self.telemetry.update(**updates)
            self._skip(present, grads, local=local_bad)
            return
        if stats is not None:
            rows = host[offset : offset + stats.numel()].view(len(present), probe.N_COLUMNS)
            offset += stats.numel()
            # min |g| is measured on detail steps only; other steps show the last measurement
            layers = self.layer_map.fold_stats(present, rows, abs_min=None if detail else self._min)
            if detail:
                self._min = dict(zip(layers, layers.column("grad_abs_min")))
            updates["layers"] = layers
            remedy.observe_healthy(
                values["global_norm"], max(layers.column("grad_norm")), max(layers.column("grad_abs_max"))
            )
        elif sampled:
            remedy.observe_healthy(values["global_norm"], None, None)
        if ratio is not None:
            sums = host[offset:].view(len(ratio.present), 2)
            updates["update_ratio"] = self.layer_map.fold_ratio(ratio.present, sums)
        updates["grad_global_norm"] = values["global_norm"]
        self.telemetry.record_peak("grad_global_norm", values["global_norm"])
        if detail and self.per_layer:
            self._before = (present, layout, probe.snapshot(params, layout))
        self._hold_spike(grads, norms, values["global_norm"], present)
        self._clip_and_scale(grads, norms, present)
        updates["learning_rates"] = [float(g["lr"]) for g in self.optimizer.param_groups]
        self.telemetry.update(**updates)

    def _hold_spike(self, grads: list[Tensor], norms: Tensor, global_norm: float, present: list[int]) -> None:
        """Clip a finite spike to the guard's bound (unless remediation clipping already bounds the step)."""
        if self.spikes is None:
            return
        bound = self.spikes.bound()
        self.held, self.global_norm = bound is not None and global_norm > bound, global_norm
        if bound is None or global_norm <= bound or self.remedy.clipping_active:
            self.spikes.record(global_norm)
            self._calm = (present, norms)  # a reference to this step's norms, no copy: for the next spike's report
            return
        # The spike stays out of the history: the bound holds until the watchdog (or a human) acts.
        clipping.global_norm_(grads, norms, bound)
        self.telemetry.count("spike_clipped", "global_norm")
        layer, rise = self._steepest_rise(present, norms)
        self._warn.warning(
            "spike",
            "gradwatch: step %d: gradient norm %.3g is above mean + %gσ of recent steps (%.3g): clipped to it; "
            "most of it in layer %r (%s)",
            self.step, global_norm, self.spikes.sigma, bound, layer, rise,
        )

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
        self.remedy.apply_lr(self.optimizer)

    def _layout_for(self, present: list[int], grads: list[Tensor]) -> probe.Layout:
        """The probe's layout for this step's gradients: built again when other parameters
        have gradients, or the model moved to another device."""
        if self._layout is not None:
            had, device, layout = self._layout
            if had == present and device == grads[0].device:
                return layout
        layout = probe.Layout(grads)
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
        self._layout = None
        if self.ranks.distributed and self.config.sync_ranks and self._synced_step != self.step:
            device = next((p.grad.device for p in self.params if p.grad is not None), torch.device("cpu"))
            if self._sync(torch.zeros((), device=device), 0).item():
                self._clear_grads()
                self.telemetry.count("skipped", "nonfinite_peer")

    def after_step(self) -> None:
        self.remedy.restore_lr(self.optimizer)
        self.commands.after_step(self.step)
        if self._before is None or self._skipping:
            return
        present, layout, before = self._before
        self._before = None
        self._ratio = _PendingRatio(present, probe.update_l1(before, [self.params[i] for i in present], layout))

    # -- the rare path -----------------------------------------------------------------

    def _skip(self, present: list[int], grads: list[Tensor], local: bool) -> None:
        """Turn this optimizer step into a no-op and account for it."""
        self._skipping = self.held = True
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
        if self._loss is not None:
            self.telemetry.update(loss=float(self._loss))
