"""The wire schema between agent and watchdog: registration, commands, acknowledgements.

Needs only pydantic and the standard library, because the agent imports it inside
the training process. Unknown fields are refused so a version mismatch is loud.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import math
import os
import re
import secrets
import threading
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator

RUN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"

# Bounds on what enters from the network: every number fits the store's 64-bit integers and
# every float the arithmetic it feeds, so bad input is a 422 naming the field, never a 500.
MAX_INT64 = 2**63 - 1
MAX_RANK = 2**20  # world sizes in the millions are not a thing; the bound keeps labels short
MAX_PID = 2**32  # Linux caps pids at 2**22, Windows at 2**32
MAX_HOSTNAME = 253  # DNS's limit on a full name
MAX_CLIP_THRESHOLD = 1e6
"""Largest explicit clipping threshold: its square (1e12) and its ratio to any gradient norm stay far
inside float32 (3.4e38), so clipping arithmetic cannot overflow to inf/NaN. float16 (65504) is
narrower: the agent checks a threshold against its gradients' own dtype."""
MIN_LR_FACTOR = 0.01
"""Smallest LowerLR factor: one command may cut the learning rate 100×, not to nothing."""
MAX_Z = 100.0
"""Largest adaptive-clipping z-score (ZClip uses 2-3; above this it never clips)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Registration(_Strict):
    """Sent by an agent when it starts (and again after a watchdog restart)."""

    run: str = Field(pattern=RUN_PATTERN, description="Run name, the `run` label of every metric.")
    rank: int = Field(ge=0, lt=MAX_RANK, description="torch.distributed rank; 0 outside distributed jobs.")
    world_size: int = Field(default=1, ge=1, le=MAX_RANK)
    metrics_url: HttpUrl = Field(description="The agent's /metrics endpoint.")
    step: int = Field(
        default=0, ge=0, le=MAX_INT64, description="Optimizer step at registration (a resumed run is past 0)."
    )
    pid: int | None = Field(default=None, ge=0, le=MAX_PID)
    hostname: str | None = Field(default=None, max_length=MAX_HOSTNAME)
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
    factor: float = Field(
        default=0.5, ge=MIN_LR_FACTOR, lt=1, allow_inf_nan=False,
        description=f"In [{MIN_LR_FACTOR}, 1): one command cuts the LR by at most {1 / MIN_LR_FACTOR:g}x.",
    )
    min_lr: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, description="Never lower any group's effective LR below this."
    )


class RestoreLR(_Strict):
    """Raise the learning-rate scale back: by ``factor`` (never above 1), or straight to 1 when None."""

    action: Literal["restore_lr"] = "restore_lr"
    factor: float | None = Field(default=None, gt=1, le=10, allow_inf_nan=False)


class EnableClipping(_Strict):
    action: Literal["enable_clipping"] = "enable_clipping"
    mode: ClipMode = "global_norm"
    threshold: float | Literal["auto"] = Field(
        default="auto",
        description=f"A number in (0, {MAX_CLIP_THRESHOLD:g}], or `auto`: derived from the run's recent healthy norms.",
    )
    z: float = Field(
        default=2.5, gt=0, le=MAX_Z, allow_inf_nan=False,
        description="adaptive mode: z-score above which the norm is clipped (ZClip).",
    )

    @field_validator("threshold")
    @classmethod
    def _bounded(cls, value):
        if value != "auto" and not (math.isfinite(value) and 0 < value <= MAX_CLIP_THRESHOLD):
            raise ValueError(
                f"threshold must be 'auto' or a finite number in (0, {MAX_CLIP_THRESHOLD:g}], not {value!r}: "
                "a larger one overflows gradient arithmetic (float32 holds up to 3.4e38)"
            )
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

    command_id: str = Field(max_length=64)
    run: str = Field(pattern=RUN_PATTERN)
    rank: int = Field(ge=0, lt=MAX_RANK)
    status: AckStatus
    step: int | None = Field(default=None, ge=0, le=MAX_INT64, description="Optimizer step at which it took effect.")
    detail: str = Field(default="", max_length=1024)
    at: float = Field(allow_inf_nan=False, description="Agent wall-clock time of the decision.")
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
_NONCE = re.compile(r"[0-9a-f]{16,64}")


def _request_mac(secret: bytes, timestamp: str, nonce: str, method: str, path: str, body: bytes) -> str:
    message = "\n".join([timestamp, nonce, method.upper(), path, hashlib.sha256(body).hexdigest()]).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign_request(secret: bytes, method: str, path: str, body: bytes, now: float, nonce: str | None = None) -> str:
    """Value of the X-Gradwatch-Auth header for one HTTP request (path without the host).

    ``TIMESTAMP.NONCE.MAC``: the MAC covers the time, a random nonce (fresh for every request
    unless given), the method, the path and the body's hash. The nonce makes two identical
    requests carry different signatures, so the watchdog can accept each signature once.
    """
    timestamp = f"{now:.3f}"
    nonce = secrets.token_hex(16) if nonce is None else nonce
    return f"{timestamp}.{nonce}.{_request_mac(secret, timestamp, nonce, method, path, body)}"


class ReplayGuard:
    """Signatures already accepted, remembered while their timestamp is within the skew window.

    Bounded: at most ``capacity`` entries. When full, the oldest-dated entries are dropped and
    every request dated at or before them is refused from then on ("too old to check"), so a full
    guard shortens the window instead of letting a replay through. Thread-safe.
    """

    def __init__(self, capacity: int = 100_000, window_s: float = AUTH_MAX_SKEW_S) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self.window_s = window_s
        self._seen: set[str] = set()
        self._by_time: list[tuple[float, str]] = []  # heap of (timestamp, mac)
        self._floor = -math.inf  # requests dated at or before this can no longer be checked
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def accept(self, timestamp: float, mac: str, now: float) -> str | None:
        """Remember ``mac``; None the first time, else why the request is refused."""
        with self._lock:
            while self._by_time and self._by_time[0][0] < now - self.window_s:  # past the window: refused anyway
                self._seen.discard(heapq.heappop(self._by_time)[1])
            if mac in self._seen:
                return "replayed request: this signature was already used (each signed request is accepted once)"
            if timestamp <= self._floor:
                return "request too old to check for replay (the watchdog's replay guard is full); sign it anew"
            while len(self._seen) >= self.capacity:
                self._floor, old = heapq.heappop(self._by_time)
                self._seen.discard(old)
                if timestamp <= self._floor:
                    return "request too old to check for replay (the watchdog's replay guard is full); sign it anew"
            self._seen.add(mac)
            heapq.heappush(self._by_time, (timestamp, mac))
            return None


def verify_request(
    secret: bytes, header: str | None, method: str, path: str, body: bytes, now: float,
    replay: ReplayGuard | None = None,
) -> str | None:
    """None if the header authenticates this request, else the reason it does not.

    With ``replay``, a signature is accepted once: the same header again is refused.
    """
    parts = header.rsplit(".", 2) if header else []
    if len(parts) != 3:
        return "missing or malformed X-Gradwatch-Auth header (TIMESTAMP.NONCE.MAC)"
    timestamp, nonce, mac = parts
    if not _NONCE.fullmatch(nonce):
        return "malformed nonce in X-Gradwatch-Auth (16-64 hex digits; is the sender's gradwatch older?)"
    try:
        sent_at = float(timestamp)
    except ValueError:
        return "malformed timestamp in X-Gradwatch-Auth"
    skew = abs(now - sent_at)
    if not skew <= AUTH_MAX_SKEW_S:  # NaN included
        return f"request timestamp is {skew:.0f} s away from the watchdog's clock"
    if not hmac.compare_digest(_request_mac(secret, timestamp, nonce, method, path, body), mac):
        return "bad signature (is GRADWATCH_SECRET the same on both sides?)"
    return replay.accept(sent_at, mac, now) if replay is not None else None


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
