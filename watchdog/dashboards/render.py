"""Turn the dashboard builders into the JSON committed in ``dashboards/``.

The JSON is the artefact everything else reads (Grafana's file provisioning, the
Kubernetes sidecar ConfigMap, ``gradwatch dashboards push``); a test regenerates it
and fails when the committed files differ. Output is deterministic: sorted keys,
two-space indent, a final newline.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from gradwatch.watchdog.dashboards.layers import build_layers
from gradwatch.watchdog.dashboards.overview import build_overview
from gradwatch.watchdog.dashboards.sdk import JSONEncoder

DASHBOARDS: dict[str, Callable] = {
    "gradwatch-overview.json": build_overview,
    "gradwatch-layers.json": build_layers,
}
"""File name in ``dashboards/`` -> builder factory."""


def render(build: Callable) -> str:
    """The dashboard's JSON text, as committed."""
    board = build().build()
    # The SDK leaves panel ids to Grafana; fixed ids keep panel links (viewPanel=N) stable.
    for number, panel in enumerate(board.panels or [], start=1):
        panel.id_val = number
    return json.dumps(board, cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render_all() -> dict[str, str]:
    """Every dashboard's JSON text, by file name."""
    return {name: render(build) for name, build in DASHBOARDS.items()}


def write_all(directory: str | Path) -> list[Path]:
    """Write every dashboard into ``directory`` (created if missing); returns the files written."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_all().items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale_files(directory: str | Path) -> list[str]:
    """Names of the dashboards whose file in ``directory`` is missing or differs from the generator's output."""
    out = Path(directory)
    return [
        name for name, text in render_all().items()
        if not (out / name).is_file() or (out / name).read_text(encoding="utf-8") != text
    ]
