"""Who may change a training run: request authentication for the watchdog's HTTP API.

With a shared secret configured, agents and the CLI sign each request (the
``X-Gradwatch-Auth`` header: an HMAC over time, a nonce, method, path and body;
each signature is accepted once), and Alertmanager presents the secret as a bearer
token. Without a secret (open mode) the watchdog notifies only: it accepts
registrations and serves no commands, the endpoints that would change a run refuse
with 403, and a registration can neither take a live run from its own agent nor
point the watchdog at an address other than the registering client's own.
Refused requests are audited through :class:`~gradwatch.watchdog.refusals.RefusalAudit`
(counted and sampled, never one row each).
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from urllib.parse import urlsplit, urlunsplit

from fastapi import HTTPException, Request, status

from gradwatch.watchdog.schema import AUTH_HEADER, Registration, verify_request
from gradwatch.watchdog.service import Service

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _target(request: Request) -> str:
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def client_host(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def signed_request(service: Service, *, required: bool):
    """A dependency checking X-Gradwatch-Auth. ``required``: refuse (403) when no secret is configured."""

    async def check(request: Request) -> None:
        secret = service.commands.secret
        if secret is None:
            if required:
                raise HTTPException(status.HTTP_403_FORBIDDEN, "no command secret configured: remediation is disabled")
            return
        body = await request.body()  # bounded by the API's body limit, which runs first
        reason = verify_request(
            secret, request.headers.get(AUTH_HEADER), request.method, _target(request), body, service.clock(),
            service.replay_guard,
        )
        if reason is not None:
            service.refusals.refused(
                "auth.refused", client_host(request), reason, {"method": request.method, "path": request.url.path}
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
            reason = "bad or missing bearer token"
            service.refusals.refused("auth.refused", client_host(request), reason, {"method": "POST", "path": request.url.path})
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, reason)

    return check


# -- where a registration may point the watchdog -----------------------------------------------


def _ip(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _same_machine(a: IPAddress, b: IPAddress) -> bool:
    return a == b or (a.is_loopback and b.is_loopback)


def _allowlisted(host: str, address: IPAddress | None, allowed: list[str]) -> bool:
    for entry in allowed:
        if entry == "*" or entry.lower() == host.lower():
            return True
        if address is not None and "/" in entry:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
    return False


def _resolve(host: str) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return [a for a in (_ip(str(info[4][0])) for info in infos) if a is not None]


def bind_metrics_url(registration: Registration, client: str, allowed: list[str]) -> Registration:
    """The registration with its metrics URL checked against the registering client's address.

    An unspecified host (``0.0.0.0``, ``::``) becomes the client's address. Otherwise the URL's
    host must be the client's own address (a name resolving to it; loopback for loopback), or
    match ``allowed`` (host names, addresses, CIDR networks, ``*`` for any). Raises ValueError.
    """
    url = urlsplit(str(registration.metrics_url))
    host = url.hostname or ""
    source = _ip(client)
    target = _ip(host)
    if target is not None and target.is_unspecified:
        if source is None:
            raise ValueError(f"metrics_url host {host} is unspecified and the client's address is unknown")
        netloc = f"[{source}]" if source.version == 6 else str(source)
        if url.port is not None:
            netloc += f":{url.port}"
        return Registration(**{**registration.model_dump(), "metrics_url": urlunsplit(url._replace(netloc=netloc))})
    if _allowlisted(host, target, allowed):
        return registration
    if source is not None:
        candidates = [target] if target is not None else _resolve(host)
        if any(_same_machine(source, c) for c in candidates):
            return registration
    raise ValueError(
        f"metrics_url host {host!r} is not the registering client's address ({client}): an agent registers its "
        "own endpoint (bind 0.0.0.0 and the watchdog uses the address it sees), or add the host to "
        "registration_hosts"
    )
