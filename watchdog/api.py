"""The watchdog's HTTP API: a FastAPI app built over one :class:`~gradwatch.watchdog.service.Service`.

``create_app(service)`` is the only entry point: no module-level app or state, so
tests build as many apps as they like. Each group of endpoints comes from a router
factory taking the service; a new group (remediation commands, acknowledgements)
is one more factory in :data:`ROUTERS`. Handlers only translate HTTP to service
calls and back. FastAPI serves the OpenAPI document at ``/openapi.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib.metadata import version

from fastapi import APIRouter, Depends, FastAPI, Query, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gradwatch.watchdog.api_models import (
    AlertOut,
    AlertStatus,
    AuditOut,
    HealthOut,
    ProblemOut,
    RegisteredOut,
    ReloadOut,
    RunOut,
)
from gradwatch.watchdog.api_auth import signed_request
from gradwatch.watchdog.api_commands import commands_router
from gradwatch.watchdog.api_incidents import incidents_router
from gradwatch.watchdog.schema import Registration
from gradwatch.watchdog.service import Service
from gradwatch.watchdog.store import MAX_LIMIT

PREFIX = "/api/v1"
Limit = Query(100, ge=1, le=MAX_LIMIT, description="Most entries returned (newest first).")


def runs_router(service: Service) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["runs"])

    @router.post("/runs", status_code=status.HTTP_201_CREATED, dependencies=[Depends(signed_request(service, required=False))])
    def register_run(registration: Registration) -> RegisteredOut:
        """Register an agent (at its start, and again after either side restarts); it is scraped from the next round."""
        return RegisteredOut(run=RunOut.of(service.register(registration)), scrape_interval_s=service.settings.scrape_interval)

    @router.get("/runs")
    def list_runs(run: str | None = None) -> list[RunOut]:
        """Registered runs, stale ones included."""
        return [RunOut.of(r) for r in service.runs(run=run)]

    return router


def alerts_router(service: Service) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["alerts"])

    @router.get("/alerts")
    def list_alerts(run: str | None = None, state: AlertStatus | None = None, rule: str | None = None) -> list[AlertOut]:
        """Alerts as of the last evaluation: pending, firing and recently resolved."""
        return [AlertOut.of(a) for a in service.alerts(run=run, state=state, rule=rule)]

    @router.get("/alerts/history")
    def alert_history(
        run: str | None = None,
        rule: str | None = None,
        fingerprint: str | None = None,
        since: float | None = Query(None, description="Only entries at or after this time (epoch seconds)."),
        limit: int = Limit,
    ) -> list[AuditOut]:
        """Past alert transitions (pending, firing, resolved, dropped), newest first."""
        entries = service.alert_history(run=run, rule=rule, fingerprint=fingerprint, since=since, limit=limit)
        return [AuditOut.of(e) for e in entries]

    return router


def audit_router(service: Service) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["audit"])

    @router.get("/audit")
    def list_audit(
        run: str | None = None,
        kind: str | None = Query(None, description="An exact kind (alert.firing) or a family ending in '.' (notify.)."),
        since: float | None = Query(None, description="Only entries at or after this time (epoch seconds)."),
        limit: int = Limit,
    ) -> list[AuditOut]:
        """The audit log: every alert transition, notification attempt, registration and reload, newest first."""
        return [AuditOut.of(e) for e in service.audit(run=run, kind=kind, since=since, limit=limit)]

    return router


def rules_router(service: Service) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["rules"])

    @router.post("/rules/reload", responses={400: {"model": ReloadOut, "description": "The file has problems; nothing changed."}})
    def reload_rules() -> ReloadOut:
        """Re-read the config file the watchdog was started with (as SIGHUP does). A bad file changes nothing."""
        result = service.reload()
        problems = [ProblemOut.of(p) for p in result.problems]
        body = ReloadOut(ok=result.ok, source=result.source, rules=result.rules, problems=problems)
        if not result.ok:
            return JSONResponse(status_code=status.HTTP_400_BAD_REQUEST, content=body.model_dump(mode="json"))
        return body

    return router


def ops_router(service: Service) -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", responses={503: {"model": HealthOut, "description": "The evaluation loop is stuck or dead."}})
    def healthz() -> HealthOut:
        """200 while the evaluation loop runs on time; 503 when it stalled. The body says more."""
        health = HealthOut.of(service.health())
        if health.status == "stalled":
            return JSONResponse(status_code=status.HTTP_503_SERVICE_UNAVAILABLE, content=health.model_dump(mode="json"))
        return health

    @router.get("/metrics", response_class=Response)
    def metrics() -> Response:
        """The watchdog's own metrics (Prometheus text format): round durations, scrape and notification failures."""
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


ROUTERS: Sequence[Callable[[Service], APIRouter]] = (
    runs_router, commands_router, alerts_router, audit_router, rules_router, ops_router, incidents_router,
)
"""Every endpoint group, each built over the service."""


def create_app(service: Service, routers: Sequence[Callable[[Service], APIRouter]] = ROUTERS) -> FastAPI:
    """The HTTP app over ``service``; it does not start or close the service (the caller owns it)."""
    app = FastAPI(
        title="gradwatch watchdog",
        version=version("gradwatch"),
        description="Watches registered PyTorch training runs, evaluates alert rules and notifies.",
    )
    for build in routers:
        app.include_router(build(service))
    return app
