"""Bounds on what one HTTP request may make the watchdog read, and 4xx (never 500) for bad input.

:class:`BodyLimit` is the outermost ASGI layer, so it runs before authentication:
a body whose ``Content-Length`` is over the limit is refused (413) before a byte of
it is read, and a body without one (chunked) is counted as it streams in and
refused as soon as it passes the limit. A 50-MB upload costs the watchdog at most
``max_bytes`` of memory, with or without a secret.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """ASGI middleware: request bodies over ``max_bytes`` get 413; ``on_refused(scope, reason)`` is told of each."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_refused: Callable[[Scope, str], None]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0:
                await self._refuse(scope, receive, send, status.HTTP_400_BAD_REQUEST, "malformed Content-Length header")
                return
            if length > self.max_bytes:
                reason = f"request body of {length} bytes is over the limit of {self.max_bytes} (max_body_bytes)"
                await self._refuse(scope, receive, send, status.HTTP_413_CONTENT_TOO_LARGE, reason)
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    reason = f"request body is over the limit of {self.max_bytes} bytes (max_body_bytes)"
                    self.on_refused(scope, reason)
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, reason)
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, code: int, reason: str) -> None:
        self.on_refused(scope, reason)
        # Connection: close, so the server does not read the unread body to reuse the connection.
        response = JSONResponse({"detail": reason}, status_code=code, headers={"Connection": "close"})
        await response(scope, receive, send)


def add_error_handlers(app: FastAPI) -> None:
    """A model built inside a handler from request data (e.g. an Alertmanager alert's labels) that
    fails validation is the client's error: 422 with the reasons, not 500. A store that cannot be
    written (a full disk) is the service's own trouble, said as such: 503, and /healthz reports it."""

    @app.exception_handler(sqlite3.Error)
    async def _store(request: Request, exc: sqlite3.Error) -> JSONResponse:
        detail = f"the watchdog's store cannot be written ({exc}); nothing was recorded, try again later"
        return JSONResponse({"detail": detail}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)

    async def _invalid(request: Request, exc: ValidationError | RequestValidationError) -> JSONResponse:
        # Without the input: it may be NaN (not JSON, FastAPI's own handler fails on it with a 500) or huge.
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    app.add_exception_handler(ValidationError, _invalid)
    app.add_exception_handler(RequestValidationError, _invalid)
