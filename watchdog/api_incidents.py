"""Incident records over HTTP: ``GET /api/v1/incidents`` (newest first) and ``GET /api/v1/incidents/{id}``
(the record with its evidence and its timeline). Non-finite values are written as Prometheus's
API writes them ("NaN", "+Inf"): they are what a sick run produces, and JSON has no number for them."""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, HTTPException, Query, status
from gradwatch.watchdog.incidents import Incident
from gradwatch.watchdog.service import Service, format_value

PREFIX = "/api/v1"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return format_value(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def summary(incident: Incident) -> dict[str, Any]:
    return _json_safe({
        "id": incident.id, "run": incident.run, "rank": incident.rank, "outcome": incident.outcome,
        "onset_at": incident.onset_at, "onset_step": incident.onset_step, "opened_at": incident.opened_at,
        "closed_at": incident.closed_at, "alerts": incident.alerts,
    })


def incidents_router(service: Service) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["incidents"])

    @router.get("/incidents")
    def list_incidents(
        run: str | None = None,
        outcome: str | None = Query(None, description="open, recovered, not_recovered, rolled_back or stopped"),
        alert: str | None = Query(None, description="Only the incident holding this alert fingerprint (notifications link here)."),
        limit: int = Query(100, ge=1, le=1000),
    ) -> list[dict[str, Any]]:
        """Incident records (one for every critical alert; an explosion's alerts share one), newest first."""
        return [summary(i) for i in service.incidents.list(run=run, outcome=outcome, alert=alert, limit=limit)]

    @router.get("/incidents/{incident_id}")
    def get_incident(incident_id: str) -> dict[str, Any]:
        """One incident: its onset, outcome, the evidence series around the onset, and its timeline."""
        incident = service.incidents.get(incident_id)
        if incident is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no incident {incident_id!r}")
        return {**summary(incident), "evidence": _json_safe(incident.evidence),
                "timeline": _json_safe(service.incidents.timeline(incident))}

    return router
