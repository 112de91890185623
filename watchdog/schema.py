"""The wire schema between agent and watchdog: registration, commands, acknowledgements.

Needs only pydantic and the standard library, because the agent imports it inside
the training process. Unknown fields are refused so a version mismatch is loud.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

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
