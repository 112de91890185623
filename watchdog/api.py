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

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response, status
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
from gradwatch.watchdog.api_auth import bind_metrics_url, client_host, signed_request
from gradwatch.watchdog.api_commands import commands_router, pins_router
from gradwatch.watchdog.api_limits import BodyLimit, add_error_handlers
from gradwatch.watchdog.api_incidents import incidents_router
from gradwatch.watchdog.schema import Registration
from gradwatch.watchdog.service import RegistrationRefused, Service
from gradwatch.watchdog.sources.targets import RegistryFull
from gradwatch.watchdog.store import MAX_LIMIT

PREFIX = "/api/v1"
Limit = Query(100, ge=1, le=MAX_LIMIT, description="Most entries returned (newest first).")


def runs_router(service: Service) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["runs"])

    @router.post(
        "/runs", status_code=status.HTTP_201_CREATED, dependencies=[Depends(signed_request(service, required=False))],
        responses={
            403: {"description": "The metrics URL is not the registering client's own address (nor allowlisted)."},
            409: {"description": "Another live agent instance holds this run and rank (open mode)."},
            429: {"description": "The watchdog holds max_registrations runs already (stale ones expire)."},
        },
    )
    def register_run(registration: Registration, request: Request) -> RegisteredOut:
        """Register an agent (at its start, and again after either side restarts); it is scraped from the next round.

        Its metrics URL must point at the registering client's own address (an unspecified host,
        0.0.0.0, is replaced by it) or at a host in `registration_hosts`. Without a secret, a live
        registration of another agent instance is not replaced (409)."""
        client = client_host(request)
        try:
            registration = bind_metrics_url(registration, client, service.settings.registration_hosts)
        except ValueError as exc:
            service.refusals.refused("run.refused", client, str(exc), {"rank": registration.rank}, run=registration.run)
            raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from None
        try:
            run = service.register(registration, authenticated=service.commands.secret is not None)
        except RegistrationRefused as exc:
            service.refusals.refused("run.refused", client, str(exc), {"rank": registration.rank}, run=registration.run)
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        except RegistryFull as exc:
            service.refusals.refused("run.refused", client, str(exc), {"rank": registration.rank}, run=registration.run)
            raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, str(exc)) from None
        return RegisteredOut(run=RunOut.of(run), scrape_interval_s=service.settings.scrape_interval)

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

    @router.post(
        "/rules/reload", dependencies=[Depends(signed_request(service, required=False))],
        responses={400: {"model": ReloadOut, "description": "The file has problems; nothing changed."}},
    )
    def reload_rules() -> ReloadOut:
        """Re-read the config file the watchdog was started with (as SIGHUP does). A bad file changes nothing.

        Signed (X-Gradwatch-Auth) when a secret is set."""
        result = service.reload()
        problems = [ProblemOut.of(p) for p in result.problems]
        body = ReloadOut(ok=result.ok, source=result.source, rules=result.rules, problems=problems)
        if not result.ok:
            return JSONResponse(status_code=status.HTTP_400_BAD_REQUEST, content=body.model_dump(mode="json"))
        return body

    return router


def ops_router(service: Service) -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", responses={
        503: {"model": HealthOut, "description": "The evaluation loop is stuck or dead, or the store cannot be written."}
    })
    def healthz() -> HealthOut:
        """200 while the evaluation loop runs on time and the store can be written; 503 otherwise. The body says more."""
        health = HealthOut.of(service.health())
        if health.status in ("stalled", "unhealthy"):
            return JSONResponse(status_code=status.HTTP_503_SERVICE_UNAVAILABLE, content=health.model_dump(mode="json"))
        return health

    @router.get("/metrics", response_class=Response)
    def metrics() -> Response:
        """The watchdog's own metrics (Prometheus text format): round durations, scrape and notification failures."""
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


ROUTERS: Sequence[Callable[[Service], APIRouter]] = (
    runs_router, commands_router, pins_router, alerts_router, audit_router, rules_router, ops_router, incidents_router,
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
    add_error_handlers(app)

    def too_large(scope, reason: str) -> None:
        client = scope.get("client")
        details = {"method": scope.get("method"), "path": scope.get("path")}
        service.refusals.refused("request.refused", client[0] if client else "unknown", reason, details)

    app.add_middleware(BodyLimit, max_bytes=service.settings.max_body_bytes, on_refused=too_large)
    return app
