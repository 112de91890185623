"""Endpoints that remediate: agents poll commands and acknowledge them, operators issue them,
Alertmanager forwards Prometheus-fired alerts, runs deregister when they finish."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field

from gradwatch.watchdog.api_auth import bearer_secret, client_host, signed_request
from gradwatch.watchdog.commands import CommandRefused
from gradwatch.watchdog.restore import pin
from gradwatch.watchdog.schema import MAX_INT64, MAX_RANK, RUN_PATTERN, Ack, Action, CommandBatch
from gradwatch.watchdog.service import RegistrationRefused, Service
from gradwatch.watchdog.store import MAX_LIMIT, CommandRecord

PREFIX = "/api/v1"
RunName = Annotated[str, Path(pattern=RUN_PATTERN)]
Rank = Query(0, ge=0, lt=MAX_RANK)


class ManualCommand(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: Action
    reason: str = Field("operator", max_length=512)


class AlertmanagerAlert(BaseModel):
    """One alert of Alertmanager's webhook payload: the fields the mapping reads, checked; others ignored."""

    status: str = Field(max_length=32)
    labels: dict[Annotated[str, Field(max_length=256)], Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=dict
    )
    fingerprint: str = Field("", max_length=128)
    startsAt: str = Field("", max_length=64)  # noqa: N815 (Alertmanager's name)


class AlertmanagerPayload(BaseModel):
    """Alertmanager's webhook body (version 4); a malformed one is a 422 naming the field."""

    status: str | None = Field(None, max_length=32)
    alerts: list[AlertmanagerAlert] = Field(default_factory=list, max_length=10_000)


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

    @router.get("/runs/{run}/commands", dependencies=[agent_auth], responses={404: {"description": "Not registered."}})
    def poll(run: RunName, rank: int = Rank, after: int = Query(0, ge=0, le=MAX_INT64)) -> CommandBatch:
        """An agent's poll: signed commands for ``run`` numbered above ``after`` (its last seen seq).

        404 `run not registered` for a (run, rank) the watchdog does not watch: the agent registers again."""
        if service.registry.get((run, rank)) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "run not registered")
        if service.commands.secret is None:
            return CommandBatch(poll_interval_s=service.settings.poll_interval)
        return service.commands.poll(run, rank, after)

    @router.post("/runs/{run}/acks", dependencies=[agent_auth])
    def acknowledge(run: RunName, acks: list[Ack]) -> dict:
        """The agent's answers: applied at step N, or refused and why."""
        try:
            return {"recorded": service.commands.acknowledge(run, acks)}
        except ValueError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from None

    @router.delete("/runs/{run}", dependencies=[agent_auth], responses={403: {"description": "Not its own agent."}})
    def finished(request: Request, run: RunName, rank: int = Rank, instance: str | None = Query(None, max_length=64)) -> dict:
        """A run finished cleanly: stop watching it (its silence is not a stall).

        Signed when a secret is set; without one, only the registering agent (its `instance`) may."""
        try:
            removed = service.deregister(run, rank, instance=instance, authenticated=service.commands.secret is not None)
        except RegistrationRefused as exc:
            service.refusals.refused("run.refused", client_host(request), str(exc), {"rank": rank}, run=run)
            raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from None
        return {"removed": removed}

    @router.post("/runs/{run}/commands", status_code=status.HTTP_201_CREATED, dependencies=[operator_auth])
    def issue(run: RunName, body: ManualCommand) -> CommandOut:
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
    def alertmanager(body: AlertmanagerPayload) -> dict:
        """Alertmanager's webhook (v4): alerts labelled `gradwatch_action` become commands for their `run`."""
        payload = body.model_dump()
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
