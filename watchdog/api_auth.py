"""Who may change a training run: request authentication for the watchdog's HTTP API.

With a shared secret configured, agents and the CLI sign each request (the
``X-Gradwatch-Auth`` header: an HMAC over time, method, path and body), and
Alertmanager presents the secret as a bearer token. Without a secret the watchdog
notifies only: it accepts registrations and serves no commands, and the endpoints
that would change a run refuse with 403.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import HTTPException, Request, status

from gradwatch.watchdog.schema import AUTH_HEADER, verify_request
from gradwatch.watchdog.service import Service

log = logging.getLogger("gradwatch.watchdog")


def _target(request: Request) -> str:
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def signed_request(service: Service, *, required: bool):
    """A dependency checking X-Gradwatch-Auth. ``required``: refuse (403) when no secret is configured."""

    async def check(request: Request) -> None:
        secret = service.commands.secret
        if secret is None:
            if required:
                raise HTTPException(status.HTTP_403_FORBIDDEN, "no command secret configured: remediation is disabled")
            return
        body = await request.body()
        reason = verify_request(
            secret, request.headers.get(AUTH_HEADER), request.method, _target(request), body, service.clock()
        )
        if reason is not None:
            log.warning("refused %s %s from %s: %s", request.method, request.url.path, request.client, reason)
            service.store.append_audit(
                "auth.refused", time=service.clock(),
                details={"method": request.method, "path": request.url.path, "reason": reason},
            )
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, reason)

    return check


def bearer_secret(service: Service):
    """A dependency for Alertmanager's webhook: ``Authorization: Bearer <secret>``."""

    async def check(request: Request) -> None:
        secret = service.commands.secret
        if secret is None:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "no command secret configured: remediation is disabled")
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), secret):
            log.warning("refused Alertmanager webhook from %s: bad or missing bearer token", request.client)
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "bad or missing bearer token")

    return check
