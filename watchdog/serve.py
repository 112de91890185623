"""``gradwatch serve``: check everything, bind, run the service and its HTTP API until told to stop.

Order matters: settings and the config file are validated before anything binds
or opens the store, so a bad file is a clean refusal (exit 2) with every problem
printed; then the socket is bound (a taken port fails before any thread starts);
then the service starts its loop and uvicorn serves the app on that socket.
SIGHUP reloads the config file on a worker thread (a bad file is logged and the
old rules keep running); SIGTERM and SIGINT stop uvicorn, then the service
(its loop, a last notification attempt, the store).
"""

from __future__ import annotations

import logging
import signal
import socket
import sqlite3
import sys
import threading
from typing import Any

log = logging.getLogger("gradwatch.watchdog")

OPEN_MODE_WARNING = (
    "\n" + "!" * 78 + "\n"
    "OPEN MODE: no secret is set (GRADWATCH_SECRET / GRADWATCH_SECRET_FILE). Anyone who can reach this port can\n"
    "register runs, read every run, alert and audit entry, and reload the rules. Registrations are bound to\n"
    "the registering client's address and a live run cannot be taken from its own agent, but nothing is\n"
    "authenticated and no remediation command is served. Set a secret for anything but a trusted network.\n"
    + "!" * 78
)


def serve(overrides: dict[str, Any]) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code. ``overrides``: settings given as flags."""
    from pydantic import ValidationError

    from gradwatch.watchdog.cli import EXIT_FAILURE, EXIT_REFUSED, format_problem
    from gradwatch.watchdog.config_file import ConfigError, load_config
    from gradwatch.watchdog.settings import Settings

    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "settings"
            print(f"gradwatch serve: {field}: {err['msg']}", file=sys.stderr)
        return EXIT_REFUSED
    _configure_logging(settings.log_level)
    try:
        config = load_config(settings.config)
    except ConfigError as exc:
        n = len(exc.problems)
        print(f"gradwatch serve: refusing to start, {n} problem{'' if n == 1 else 's'} in {exc.source}:", file=sys.stderr)
        for problem in exc.problems:
            print(format_problem(exc.source, problem), file=sys.stderr)
        return EXIT_REFUSED
    try:
        sock = _bind(settings.host, settings.port)
    except OSError as exc:
        print(f"gradwatch serve: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        return _run(settings.model_copy(update={"port": sock.getsockname()[1]}), config, sock)
    finally:
        sock.close()


def _run(settings, config, sock: socket.socket) -> int:
    import uvicorn

    from gradwatch.watchdog.api import create_app
    from gradwatch.watchdog.cli import EXIT_REFUSED
    from gradwatch.watchdog.service import Service
    from gradwatch.watchdog.store import StoreError

    try:
        service = Service(settings, config)
    except (StoreError, sqlite3.Error, OSError) as exc:
        print(f"gradwatch serve: cannot use the store {settings.db}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(service),
            log_config=None,  # our logging setup; uvicorn's loggers propagate to it
            log_level=settings.log_level,
            access_log=settings.log_level == "debug",
            lifespan="off",
        )
    )

    def stop(signum: int, frame: object) -> None:
        # Active outside uvicorn's own handling (before it starts, and when it re-raises
        # the signal after a graceful stop), so a signal never kills us mid-close.
        server.should_exit = True

    def reload(signum: int, frame: object) -> None:
        # Not in the handler itself: a reload waits for the evaluation round in progress.
        threading.Thread(target=service.reload, name="gradwatch-reload", daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    service.start()
    if service.commands.secret is None:
        log.warning(OPEN_MODE_WARNING)
    log.info(
        "gradwatch watchdog serving http://%s:%d (source: %s, %d rules, %d notifiers, store %s)",
        settings.host, settings.port, service.health().source, len(config.rules), len(config.notifiers), settings.db,
    )
    try:
        server.run(sockets=[sock])
    finally:
        service.close()
        log.info("gradwatch watchdog stopped")
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, reuse_port=False)


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per scrape otherwise
