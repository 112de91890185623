"""Endpoints that remediate: agents poll commands and acknowledge them, operators issue them,
Alertmanager forwards Prometheus-fired alerts, runs deregister when they finish."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, status
from pydantic import BaseModel, ConfigDict, Field

from gradwatch.watchdog.api_auth import bearer_secret, signed_request
from gradwatch.watchdog.commands import CommandRefused
from gradwatch.watchdog.restore import pin
from gradwatch.watchdog.schema import Ack, Action, CommandBatch
from gradwatch.watchdog.service import Service
from gradwatch.watchdog.store import MAX_LIMIT, CommandRecord

PREFIX = "/api/v1"


class ManualCommand(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: Action
    reason: str = Field("operator", max_length=512)


class CommandOut(BaseModel):
    id: str
    run: str
    seq: int
    action: str
    rule: str | None
    issued_at: float
    expires_at: float
    delivered_at: float | None
    ack: dict[str, Any] | None

    @classmethod
    def of(cls, r: CommandRecord) -> CommandOut:
        return cls(**{k: getattr(r, k) for k in cls.model_fields})


def commands_router(service: Service) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["commands"])
    agent_auth = Depends(signed_request(service, required=False))
    operator_auth = Depends(signed_request(service, required=True))

    @router.get("/runs/{run}/commands", dependencies=[agent_auth])
    def poll(run: str, rank: int = Query(0, ge=0), after: int = Query(0, ge=0)) -> CommandBatch:
        """An agent's poll: signed commands for ``run`` numbered above ``after`` (its last seen seq)."""
        if service.commands.secret is None:
            return CommandBatch(poll_interval_s=service.settings.poll_interval)
        return service.commands.poll(run, rank, after)

    @router.post("/runs/{run}/acks", dependencies=[agent_auth])
    def acknowledge(run: str, acks: list[Ack]) -> dict:
        """The agent's answers: applied at step N, or refused and why."""
        try:
            return {"recorded": service.commands.acknowledge(run, acks)}
        except ValueError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from None

    @router.delete("/runs/{run}", dependencies=[agent_auth])
    def finished(run: str, rank: int = Query(0, ge=0)) -> dict:
        """A run finished cleanly: stop watching it (its silence is not a stall)."""
        return {"removed": service.deregister(run, rank)}

    @router.post("/runs/{run}/commands", status_code=status.HTTP_201_CREATED, dependencies=[operator_auth])
    def issue(run: str, body: ManualCommand) -> CommandOut:
        """An operator's command (`gradwatch command RUN ...`): skips the watchdog's own bounds, not the agent's."""
        try:
            return CommandOut.of(service.commands.issue(run, body.spec, reason=body.reason, bounded=False))
        except CommandRefused as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None

    @router.get("/commands")
    def list_commands(run: str | None = None, limit: int = Query(100, ge=1, le=MAX_LIMIT)) -> list[CommandOut]:
        """Commands issued, newest first, with their acknowledgement."""
        return [CommandOut.of(r) for r in service.commands.table.list(run=run, limit=limit)]

    @router.post("/alertmanager", dependencies=[Depends(bearer_secret(service))])
    def alertmanager(payload: dict) -> dict:
        """Alertmanager's webhook (v4): alerts labelled `gradwatch_action` become commands for their `run`."""
        outcomes = service.remediator.from_alertmanager(payload, service.clock())
        service.store.append_audit(
            "alertmanager.received", time=service.clock(), details={"outcomes": outcomes, "status": payload.get("status")}
        )
        return {"outcomes": outcomes}

    return router


class PinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("operator", max_length=512)


def pins_router(service: Service) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["commands"])
    operator_auth = Depends(signed_request(service, required=True))

    @router.post("/runs/{run}/pin", dependencies=[operator_auth])
    def pin_run(run: str, body: PinRequest) -> dict:
        """Keep the run's automatic remediation in force: the watchdog will not restore it (`gradwatch pin RUN`)."""
        pin(service.commands, run, True, body.reason, service.clock())
        return {"run": run, "pinned": True}

    @router.delete("/runs/{run}/pin", dependencies=[operator_auth])
    def unpin_run(run: str, body: PinRequest | None = None) -> dict:
        """Release the pin: the watchdog may restore the run once it is healthy (`gradwatch pin RUN --release`)."""
        pin(service.commands, run, False, body.reason if body else "operator", service.clock())
        return {"run": run, "pinned": False}

    return router
