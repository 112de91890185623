"""The wire schema between agent and watchdog: registration, commands, acknowledgements.

Needs only pydantic and the standard library, because the agent imports it inside
the training process. Unknown fields are refused so a version mismatch is loud.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator

RUN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Registration(_Strict):
    """Sent by an agent when it starts (and again after a watchdog restart)."""

    run: str = Field(pattern=RUN_PATTERN, description="Run name, the `run` label of every metric.")
    rank: int = Field(ge=0, description="torch.distributed rank; 0 outside distributed jobs.")
    world_size: int = Field(default=1, ge=1)
    metrics_url: HttpUrl = Field(description="The agent's /metrics endpoint.")
    step: int = Field(default=0, ge=0, description="Optimizer step at registration (a resumed run is past 0).")
    pid: int | None = None
    hostname: str | None = None
    instance: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{8,64}$",
        description="Random id the agent draws once at attach: it names this agent process, so a registration "
        "or deregistration of a live run from anyone else can be told apart from its own.",
    )


# -- commands --------------------------------------------------------------------------

ClipMode = Literal[
    "global_norm",
    "clip_l2_per_layer",
    "clip_l2_per_param_type",
    "clip_value",
    "renorm_l2_per_layer",
    "renorm_l2_per_param_type",
    "adaptive",
]


class LowerLR(_Strict):
    """Multiply the learning-rate scale by ``factor`` (the scheduler's LR is multiplied by the scale)."""

    action: Literal["lower_lr"] = "lower_lr"
    factor: float = Field(default=0.5, gt=0, lt=1)
    min_lr: float | None = Field(default=None, ge=0, description="Never lower any group's effective LR below this.")


class RestoreLR(_Strict):
    action: Literal["restore_lr"] = "restore_lr"


class EnableClipping(_Strict):
    action: Literal["enable_clipping"] = "enable_clipping"
    mode: ClipMode = "global_norm"
    threshold: float | Literal["auto"] = Field(
        default="auto", description="A positive number, or `auto`: derived from the run's recent healthy norms."
    )
    z: float = Field(default=2.5, gt=0, description="adaptive mode: z-score above which the norm is clipped (ZClip).")

    @field_validator("threshold")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and not (value > 0 and math.isfinite(value)):
            raise ValueError("threshold must be a positive finite number or 'auto'")
        return value


class DisableClipping(_Strict):
    action: Literal["disable_clipping"] = "disable_clipping"


class Checkpoint(_Strict):
    action: Literal["checkpoint"] = "checkpoint"


class Stop(_Strict):
    action: Literal["stop"] = "stop"


MAX_SKIP_BATCHES = 10_000
"""PaLM skipped 200-500 batches after its rollbacks; far more is a different data plan, not a remedy."""


class Rollback(_Strict):
    """Go back to a state saved before the trouble began (PaLM's and OPT-175B's remedy), optionally
    skipping the batches that follow and resuming at a lower learning rate."""

    action: Literal["rollback"] = "rollback"
    before_step: int | None = Field(
        default=None, ge=1,
        description="Restore the newest state saved before this step (the incident's onset). None: before the "
        "latest step the agent's guard held (clipped or skipped), else the newest state saved.",
    )
    skip_batches: int = Field(
        default=0, ge=0, le=MAX_SKIP_BATCHES,
        description="Batches to skip after the restore (the trainer's cooperation: agent.should_skip()).",
    )
    lr_scale: float = Field(
        default=1.0, gt=0, le=1,
        description="Multiply the learning-rate scale in force by this on resume (not counted as an LR cut).",
    )


Action = Annotated[
    LowerLR | RestoreLR | EnableClipping | DisableClipping | Checkpoint | Stop | Rollback, Field(discriminator="action")
]
ACTIONS = ("lower_lr", "restore_lr", "enable_clipping", "disable_clipping", "checkpoint", "stop", "rollback")


class Command(_Strict):
    """One remediation for one run, issued by the watchdog (a rule's policy or an operator)."""

    id: str = Field(pattern=r"^[A-Za-z0-9_-]{8,64}$", description="Unique; a command applies at most once.")
    run: str = Field(pattern=RUN_PATTERN)
    seq: int = Field(ge=1, description="Position in the run's command stream; agents poll with after=<last seq>.")
    spec: Action
    reason: str = Field(default="", max_length=512, description="Rule or operator that asked for it.")
    issued_at: float
    expires_at: float

    def canonical(self) -> bytes:
        """The bytes the signature covers (sorted keys, no whitespace)."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


class SignedCommand(_Strict):
    command: Command
    signature: str = Field(description="hex HMAC-SHA256 of command.canonical() with the shared secret.")

    @classmethod
    def sign(cls, command: Command, secret: bytes) -> "SignedCommand":
        return cls(command=command, signature=hmac.new(secret, command.canonical(), hashlib.sha256).hexdigest())

    def verify(self, secret: bytes) -> bool:
        expected = hmac.new(secret, self.command.canonical(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, self.signature)


AckStatus = Literal["applied", "refused", "unsupported", "duplicate", "expired", "rejected"]


class Ack(_Strict):
    """The agent's answer to one command: applied at ``step``, or why not."""

    command_id: str
    run: str = Field(pattern=RUN_PATTERN)
    rank: int = Field(ge=0)
    status: AckStatus
    step: int | None = Field(default=None, description="Optimizer step at which it took effect.")
    detail: str = Field(default="", max_length=1024)
    at: float = Field(description="Agent wall-clock time of the decision.")
    lr_scale: float = 1.0
    clipping: str | None = Field(default=None, description="Active clipping mode after the command, if any.")
    clip_threshold: float | None = None
    restored_step: int | None = Field(default=None, description="rollback: the step whose saved state was restored.")


class CommandBatch(_Strict):
    """The watchdog's answer to an agent's poll."""

    commands: list[SignedCommand] = Field(default_factory=list)
    poll_interval_s: float = Field(default=1.0, gt=0)


# -- request authentication ---------------------------------------------------------------

AUTH_HEADER = "X-Gradwatch-Auth"
AUTH_MAX_SKEW_S = 300.0


def _request_mac(secret: bytes, timestamp: str, method: str, path: str, body: bytes) -> str:
    message = "\n".join([timestamp, method.upper(), path, hashlib.sha256(body).hexdigest()]).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign_request(secret: bytes, method: str, path: str, body: bytes, now: float) -> str:
    """Value of the X-Gradwatch-Auth header for one HTTP request (path without the host)."""
    timestamp = f"{now:.3f}"
    return f"{timestamp}.{_request_mac(secret, timestamp, method, path, body)}"


def verify_request(secret: bytes, header: str | None, method: str, path: str, body: bytes, now: float) -> str | None:
    """None if the header authenticates this request, else the reason it does not."""
    if not header or "." not in header:
        return "missing or malformed X-Gradwatch-Auth header"
    timestamp, _, mac = header.rpartition(".")
    try:
        skew = abs(now - float(timestamp))
    except ValueError:
        return "malformed timestamp in X-Gradwatch-Auth"
    if skew > AUTH_MAX_SKEW_S:
        return f"request timestamp is {skew:.0f} s away from the watchdog's clock"
    if not hmac.compare_digest(_request_mac(secret, timestamp, method, path, body), mac):
        return "bad signature (is GRADWATCH_SECRET the same on both sides?)"
    return None


def read_secret(path: str | None = None) -> bytes | None:
    """The shared command secret: the file at ``path`` if given, else GRADWATCH_SECRET; None if neither.

    Both the agent and the watchdog read it the same way.
    """
    if path:
        with open(path, "rb") as f:
            value = f.read().strip()
        if not value:
            raise ValueError(f"gradwatch: secret file {path} is empty")
        return value
    value = os.environ.get("GRADWATCH_SECRET", "").strip()
    return value.encode() if value else None
