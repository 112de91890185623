"""Provision the committed dashboards into a running Grafana through its HTTP API (grafana-client).

    push_dashboards("https://grafana.example.com", "glsa_...", load_dashboards("dashboards"))

Steps: find the folder by title (``GET /api/search?type=dash-folder``) or create it
(``POST /api/folders``), then upload every dashboard with ``overwrite`` into it
(``POST /api/dashboards/db``): pushing again replaces them, keeping their uids and
so their links. A refused token (401/403) or an unreachable Grafana raises
:class:`PushError` naming the URL and what to check, before anything else is tried.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaException

DEFAULT_FOLDER = "gradwatch"
FOLDER_UID = "gradwatch"
DEFAULT_TIMEOUT_S = 10.0
DASHBOARD_FILES = ("gradwatch-overview.json", "gradwatch-layers.json")


class PushError(Exception):
    """Grafana refused or could not be reached; the message says what to check."""


@dataclass(frozen=True)
class Pushed:
    """One dashboard as Grafana stored it."""

    title: str
    uid: str
    url: str  # absolute
    version: int


def load_dashboards(directory: str | Path) -> list[dict]:
    """The committed dashboard JSON files in ``directory``, parsed."""
    folder = Path(directory)
    missing = [name for name in DASHBOARD_FILES if not (folder / name).is_file()]
    if missing:
        raise PushError(f"{folder}: missing {', '.join(missing)} (run `gradwatch dashboards generate --out {folder}`)")
    return [json.loads((folder / name).read_text(encoding="utf-8")) for name in DASHBOARD_FILES]


def _explain(exc: GrafanaException, url: str, doing: str) -> PushError:
    status = exc.status_code
    # grafana-client's own message for a 401 is just "Unauthorized": Grafana's reason is in the body.
    body = exc.response if isinstance(exc.response, dict) else {}
    detail = body.get("message") or exc.message
    if status == 401:
        return PushError(
            f"Grafana at {url} rejected the token while {doing} (401 Unauthorized: {detail}). Check that "
            "--token is a service account token (Administration > Users and access > Service accounts) of this "
            "Grafana instance and organization, that it has not expired or been revoked, and that --url is "
            "Grafana's root URL including any sub-path."
        )
    if status == 403:
        return PushError(
            f"Grafana at {url} accepted the token but denied {doing} (403 Forbidden: {detail}). Give the "
            "service account the Editor role (or folders:create, folders:read, dashboards:create and "
            "dashboards:write on the folder)."
        )
    if status == 0:
        return PushError(f"cannot reach Grafana at {url} while {doing}: {detail}")
    return PushError(f"Grafana at {url} answered {status} while {doing}: {detail}")


def _find_or_create_folder(api: GrafanaApi, title: str) -> str:
    hits = api.search.search_dashboards(query=title, type_="dash-folder")
    for hit in hits:
        if hit.get("title") == title:
            return hit["uid"]
    uid = FOLDER_UID if title == DEFAULT_FOLDER else None
    return api.folder.create_folder(title, uid=uid)["uid"]


def push_dashboards(url: str, token: str | tuple[str, str], dashboards: list[dict], *,
                    folder: str = DEFAULT_FOLDER, timeout: float = DEFAULT_TIMEOUT_S) -> list[Pushed]:
    """Upload ``dashboards`` into ``folder`` (created if missing) at the Grafana at ``url``, overwriting.

    ``token``: a service account token, or ``(user, password)`` for basic auth.
    """
    base = url.rstrip("/")
    api = GrafanaApi.from_url(base, credential=token, timeout=timeout)
    doing = f"looking up or creating folder {folder!r}"
    try:
        folder_uid = _find_or_create_folder(api, folder)
        pushed = []
        for board in dashboards:
            doing = f"uploading dashboard {board.get('title')!r}"
            body = {"dashboard": {**board, "id": None}, "folderUid": folder_uid, "overwrite": True,
                    "message": "gradwatch dashboards push"}
            answer = api.dashboard.update_dashboard(body)
            # Grafana answers a root-relative url that already includes any sub-path.
            pushed.append(Pushed(board.get("title", ""), answer["uid"], urljoin(base + "/", answer["url"]), answer["version"]))
        return pushed
    except GrafanaException as exc:  # 4xx, 5xx, timeouts
        raise _explain(exc, base, doing) from exc
    except OSError as exc:  # the HTTP library's connection errors (requests' and niquests' derive from it)
        raise PushError(f"cannot reach Grafana at {base} while {doing}: {exc}") from exc
