"""The real watchdog service and HTTP API on a loopback port (uvicorn in a thread), for attack tests."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn

from gradwatch.watchdog.api import create_app
from gradwatch.watchdog.schema import AUTH_HEADER, sign_request
from gradwatch.watchdog.service import Service
from gradwatch.watchdog.settings import Settings


class Live:
    def __init__(self, service: Service, url: str) -> None:
        self.service = service
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10)

    def signed(self, method: str, path: str, payload=None, secret: str | None = None, **kwargs) -> httpx.Response:
        body = json.dumps(payload).encode() if payload is not None else b""
        headers = {"Content-Type": "application/json", AUTH_HEADER: self.sign(method, path, body, secret)}
        return self.http.request(method, path, content=body, headers=headers, **kwargs)

    def sign(self, method: str, path: str, body: bytes, secret: str | None = None) -> str:
        key = secret.encode() if secret is not None else self.service.commands.secret
        return sign_request(key, method, path, body, time.time())


@contextlib.contextmanager
def live_service(tmp_path, **settings) -> Iterator[Live]:
    """A started :class:`Service` (its loop included) served by uvicorn on 127.0.0.1, stopped afterwards."""
    service = Service(Settings(db=str(tmp_path / "gw.db"), scrape_interval=0.2, **settings))
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_config=None, lifespan="off", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    service.start()
    thread.start()
    live = Live(service, f"http://127.0.0.1:{sock.getsockname()[1]}")
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        yield live
    finally:
        live.http.close()
        server.should_exit = True
        thread.join(10)
        sock.close()
        service.close()
