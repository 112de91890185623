"""Read the committed dashboard JSON the way Grafana does: panels (rows included), their
PromQL, the annotation queries and the template variables."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

DASHBOARDS_DIR = Path(__file__).resolve().parents[2] / "dashboards"
FILES = ("gradwatch-overview.json", "gradwatch-layers.json")
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.*),\s*(?P<label>\w+)\)$")


def load(name: str) -> dict:
    return json.loads((DASHBOARDS_DIR / name).read_text(encoding="utf-8"))


def panels(board: dict) -> Iterator[dict]:
    """Every panel, including those nested in collapsed rows; rows themselves are skipped."""
    for panel in board.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def panel_queries(board: dict) -> Iterator[tuple[str, str, str]]:
    """(panel title, refId, expr) for every query of every panel."""
    for panel in panels(board):
        for query in panel.get("targets", []):
            yield panel["title"], query["refId"], query["expr"]


def annotation_queries(board: dict) -> Iterator[tuple[str, str, str]]:
    """(name, expr, step) of every Prometheus annotation query."""
    for annotation in board.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            yield annotation["name"], annotation["expr"], annotation.get("step", "")


def variable_queries(board: dict) -> Iterator[tuple[str, str, str]]:
    """(variable name, selector, label) of every ``label_values(selector, label)`` variable."""
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            match = LABEL_VALUES.match(variable["query"])
            assert match, f"variable {variable['name']}: not a label_values() query: {variable['query']}"
            yield variable["name"], match["selector"], match["label"]
