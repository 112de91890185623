"""``gradwatch dashboards push`` against a recorded exchange of Grafana's HTTP API.

No Grafana server can run here (none installs from the reachable registries), so this
is a recorded exchange, not a live Grafana: tests/dashboards/grafana_exchange.json holds
request/response pairs written from Grafana's documented API (folder search and
creation, ``POST /api/dashboards/db``, a 401 for a bad token, a 403 for a token without
write permission). A local HTTP server replays one scenario in order and checks that
each request grafana-client sends matches the recorded one (method, path, query,
bearer token, and the recorded keys of the JSON body); any unexpected request fails the
test. What this cannot prove: that a real Grafana of a given version accepts the
generated dashboard JSON itself.
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

pytest.importorskip("grafana_client", reason="needs the dashboards extra: pip install 'gradwatch[dashboards]'")

from gradwatch.watchdog.dashboards import commands  # noqa: E402
from gradwatch.watchdog.dashboards.push import PushError, load_dashboards, push_dashboards  # noqa: E402
from tests.dashboards.dashboard_json import DASHBOARDS_DIR  # noqa: E402

RECORDING = json.loads((Path(__file__).with_name("grafana_exchange.json")).read_text(encoding="utf-8"))
TOKEN = RECORDING["token"]


def contains(actual, recorded) -> bool:
    """``recorded`` is a subset of ``actual`` (dict keys recursively; other values equal)."""
    if isinstance(recorded, dict):
        return isinstance(actual, dict) and all(k in actual and contains(actual[k], v) for k, v in recorded.items())
    return actual == recorded


class ReplayedGrafana:
    """Answers the recorded requests of one scenario, in order; records every mismatch."""

    def __init__(self, scenario: str) -> None:
        self.exchanges = list(RECORDING["scenarios"][scenario])
        self.seen: list[tuple[str, str]] = []
        self.mismatches: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                url = urlsplit(self.path)
                owner.seen.append((self.command, url.path))
                if not owner.exchanges:
                    return self._send(500, {"message": f"unrecorded request {self.command} {self.path}"}, mismatch=True)
                expected = owner.exchanges.pop(0)
                wanted, problems = expected["request"], []
                if (self.command, url.path) != (wanted["method"], wanted["path"]):
                    problems.append(f"expected {wanted['method']} {wanted['path']}, got {self.command} {url.path}")
                if parse_qs(url.query) != wanted.get("query", {}):
                    problems.append(f"query {parse_qs(url.query)} != {wanted.get('query', {})}")
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    problems.append(f"Authorization: {self.headers.get('Authorization')!r}")
                if "body" in wanted and not contains(json.loads(body or b"null"), wanted["body"]):
                    problems.append(f"body lacks {wanted['body']}")
                if problems:
                    return self._send(500, {"message": "; ".join(problems)}, mismatch=True)
                self._send(expected["response"]["status"], expected["response"]["body"])

            def _send(self, status: int, payload, mismatch: bool = False) -> None:
                if mismatch:
                    owner.mismatches.append(payload["message"])
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> ReplayedGrafana:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dashboards() -> list[dict]:
    return load_dashboards(DASHBOARDS_DIR)


def test_creates_the_folder_and_uploads_both_dashboards(dashboards):
    with ReplayedGrafana("creates_the_folder_then_uploads") as grafana:
        pushed = push_dashboards(grafana.url, TOKEN, dashboards)
    assert grafana.mismatches == [] and grafana.exchanges == []
    assert [(p.uid, p.version) for p in pushed] == [("gradwatch-overview", 1), ("gradwatch-layers", 1)]
    assert pushed[0].url == f"{grafana.url}/d/gradwatch-overview/gradwatch-run-overview"


def test_finds_the_existing_folder_and_overwrites(dashboards):
    with ReplayedGrafana("finds_the_folder_and_overwrites") as grafana:
        pushed = push_dashboards(grafana.url + "/", TOKEN, dashboards)
    assert grafana.mismatches == [] and grafana.exchanges == []
    assert ("POST", "/api/folders") not in grafana.seen
    assert [p.version for p in pushed] == [2, 2]


def test_a_rejected_token_names_the_url_and_what_to_check(dashboards):
    with ReplayedGrafana("invalid_token") as grafana:
        with pytest.raises(PushError) as error:
            push_dashboards(grafana.url, TOKEN, dashboards)
    message = str(error.value)
    assert grafana.url in message and "401" in message and "Invalid API key" in message
    assert "service account token" in message
    assert grafana.seen == [("GET", "/api/search")]  # stopped at the first refusal


def test_a_token_without_write_permission_says_which_role_is_missing(dashboards):
    with ReplayedGrafana("viewer_token") as grafana:
        with pytest.raises(PushError) as error:
            push_dashboards(grafana.url, TOKEN, dashboards)
    message = str(error.value)
    assert grafana.url in message and "403" in message and "Editor" in message
    assert "gradwatch: run overview" in message


def test_an_unreachable_grafana_is_a_clear_error(dashboards):
    with ReplayedGrafana("invalid_token") as grafana:
        url = grafana.url
    with pytest.raises(PushError, match=f"cannot reach Grafana at {url}"):
        push_dashboards(url, TOKEN, dashboards, timeout=2)


def test_push_command_uploads_the_generated_dashboards(capsys):
    parser = argparse.ArgumentParser()
    commands.add_parser(parser.add_subparsers(dest="command"))
    with ReplayedGrafana("creates_the_folder_then_uploads") as grafana:
        args = parser.parse_args(["dashboards", "push", "--url", grafana.url, "--token", TOKEN])
        assert args.handler(args) == 0
    assert grafana.mismatches == []
    out = capsys.readouterr().out
    assert "gradwatch: run overview: " in out and "(version 1)" in out


def test_push_command_exits_1_with_the_reason_on_auth_failure(capsys, monkeypatch):
    monkeypatch.setenv(commands.TOKEN_ENV, TOKEN)
    parser = argparse.ArgumentParser()
    commands.add_parser(parser.add_subparsers(dest="command"))
    with ReplayedGrafana("invalid_token") as grafana:
        args = parser.parse_args(["dashboards", "push", "--url", grafana.url, "--dir", str(DASHBOARDS_DIR)])
        assert args.handler(args) == commands.EXIT_FAILURE
    assert "401" in capsys.readouterr().err


def test_push_command_without_a_token_says_how_to_give_one(capsys, monkeypatch):
    monkeypatch.delenv(commands.TOKEN_ENV, raising=False)
    parser = argparse.ArgumentParser()
    commands.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dashboards", "push", "--url", "http://127.0.0.1:9"])
    assert args.handler(args) == commands.EXIT_FAILURE
    assert commands.TOKEN_ENV in capsys.readouterr().err


def test_generate_command_writes_and_checks(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    commands.add_parser(parser.add_subparsers(dest="command"))
    check = parser.parse_args(["dashboards", "generate", "--out", str(tmp_path), "--check"])
    assert check.handler(check) == commands.EXIT_FAILURE  # nothing there yet
    write = parser.parse_args(["dashboards", "generate", "--out", str(tmp_path)])
    assert write.handler(write) == 0
    assert check.handler(check) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gradwatch-layers.json", "gradwatch-overview.json"]
