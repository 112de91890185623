"""Agent settings: plain, documented data, checked when built.

``watch(model, optimizer, run=..., **settings)`` builds an :class:`AgentConfig`;
a bad value raises ``ValueError`` naming the setting and the reason before any
hook is installed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gradwatch.agent.snapshots import SnapshotConfig
from gradwatch.watchdog.schema import RUN_PATTERN

DEFAULT_PORT = 9465
"""Default metrics port; rank r of a torch.distributed job adds its LOCAL_RANK."""


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str = Field(pattern=RUN_PATTERN, description="Run name: the `run` label on every metric.")
    every: int = Field(
        default=50,
        ge=1,
        description="Measure per-layer statistics every N optimizer steps. Spikes do not depend on it: with "
        "the guard on, the global norm and the loss are measured every step. Per-layer statistics serve the "
        "slow pathologies (vanishing, update-ratio drift); on CPU a sampled step of a 400-tensor model costs "
        "3-7 % of a step more than an unsampled one (benchmarks/), so 50 keeps that near 0.1 %.",
    )
    detail_every: int = Field(
        default=250,
        ge=1,
        description="Measure the update:parameter ratio and min |g| every N steps (rounded up to a "
        "multiple of `every`): both need an extra pass over every tensor.",
    )
    guard: bool = Field(
        default=True,
        description="Check every step for NaN/Inf gradients and skip such steps. Costs one read of the "
        "gradients (their L2 norms, which also give the global norm) and one host sync per step (as GradScaler does).",
    )
    spike_sigma: float | None = Field(
        default=6.0,
        gt=0,
        description="With the guard on, a step whose global gradient norm exceeds median + spike_sigma x "
        "1.4826 x MAD of the last 128 accepted steps (at least 3x their median; from step 20, up to 2x wider "
        "until step 64) is clipped to that bound (OLMo-core's test with robust statistics; it skips); a held "
        "regime on a loss that is not rising is accepted after 3 steps (agent/spikes.py). Needs the "
        "global norm every step (one multi-tensor L2 pass, as clip_grad_norm_). None: off.",
    )
    max_grad_norm: float | None = Field(
        default=None,
        gt=0,
        description="Clip the global gradient L2 norm to this, as clip_grad_norm_(max_norm=...) would, after "
        "gradwatch has measured the raw gradients: hand the framework's or the loop's own clipping to gradwatch "
        "(drop the clip_grad_norm_ call) and the exported norms stay the raw, pre-clip ones. Watchdog-commanded "
        "clipping still applies on top (the tighter wins). Needs the global norm every step. None: no clipping.",
    )
    layers: Literal["tensor", "module"] = Field(
        default="tensor",
        description="`tensor`: one `layer` label per parameter tensor; `module`: one per owning module.",
    )
    top_k: int | None = Field(
        default=None,
        ge=1,
        description="Export only the k layers with the largest gradient norm plus one `_other` aggregate.",
    )
    per_layer_ranks: Literal["zero", "all"] = Field(
        default="zero",
        description="Which torch.distributed ranks export per-layer detail. Every rank exports its "
        "step, global norm, skips and non-finite events.",
    )
    host: str = Field(default="127.0.0.1", description="Address the metrics endpoint binds (loopback by default).")
    port: int | None = Field(
        default=DEFAULT_PORT,
        ge=0,
        le=65535,
        description="Preferred metrics port (0: ephemeral). Under torch.distributed LOCAL_RANK is added to a "
        "non-zero port. If it is taken, the next free one of the 16 above it is used, then an ephemeral one "
        "(logged; the watchdog is given the real URL).",
    )
    sync_ranks: bool = Field(
        default=True,
        description="Under torch.distributed, all-reduce the guard's decision so every rank skips together.",
    )

    watchdog_url: str | None = Field(
        default=None,
        description="Watchdog to register with and take commands from (default: the GRADWATCH_URL "
        "environment variable; neither: the agent runs alone).",
    )
    secret_file: str | None = Field(
        default=None,
        description="File holding the shared command secret (default: the GRADWATCH_SECRET environment variable).",
    )
    poll_interval_s: float | None = Field(
        default=None,
        gt=0,
        le=60,
        description="How often rank 0 asks the watchdog for commands. Set, it wins over the watchdog's; None: the "
        "interval the watchdog sends with each answer, clamped to [0.1, 60] s (1 s until it has answered).",
    )
    max_lr_cuts: int = Field(default=4, ge=0, description="At most this many LR cuts per lr_cut_window_s.")
    lr_cut_window_s: float = Field(default=600.0, gt=0)
    lr_cut_cooldown_s: float = Field(default=10.0, ge=0, description="Minimum time between two LR cuts.")
    min_lr_scale: float = Field(default=1e-3, gt=0, le=1, description="The LR scale never goes below this.")
    snapshots: SnapshotConfig | None = Field(
        default=None,
        description="Keep recent good states in host memory for `rollback` commands, e.g. "
        "{'every': 100, 'keep': 4, 'include': [scheduler]} (fields: agent/snapshots.py). None: off.",
    )

    @model_validator(mode="after")
    def _align_detail(self) -> "AgentConfig":
        if self.detail_every % self.every:
            object.__setattr__(self, "detail_every", (self.detail_every // self.every + 1) * self.every)
        return self


def build_config(run: str, settings: dict) -> AgentConfig:
    """Validate ``watch()`` keyword arguments; raise ValueError naming every bad setting."""
    try:
        return AgentConfig(run=run, **settings)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise ValueError(f"gradwatch.watch: invalid settings — {problems}") from None
