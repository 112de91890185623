"""``gradwatch dashboards generate`` and ``gradwatch dashboards push``: the subparsers and their handlers.

    gradwatch dashboards generate [--out DIR] [--check]
    gradwatch dashboards push --url URL [--token TOKEN] [--folder NAME] [--dir DIR]

Importing this module is cheap (argparse only): the handlers import the
``dashboards`` extra (grafana-foundation-sdk, grafana-client) when they run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_FAILURE = 1
DEFAULT_DIR = "dashboards"
TOKEN_ENV = "GRAFANA_TOKEN"
MISSING_EXTRA = "gradwatch dashboards: needs the dashboards extra: pip install 'gradwatch[dashboards]' ({})"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``dashboards generate`` and ``dashboards push`` to the CLI's subcommands."""
    dashboards = commands.add_parser("dashboards", help="generate the Grafana dashboards or push them to Grafana")
    sub = dashboards.add_subparsers(dest="dashboards_command", metavar="COMMAND", required=True)

    generate_parser = sub.add_parser(
        "generate",
        help="write the dashboard JSON from the generator",
        description="Write gradwatch-overview.json and gradwatch-layers.json, built from code with "
        "grafana-foundation-sdk, into DIR (the repository's dashboards/ by default). With --check, write "
        "nothing and exit 1 if a file there differs from the generator's output.",
    )
    generate_parser.add_argument("--out", default=DEFAULT_DIR, metavar="DIR", help="output folder (default dashboards)")
    generate_parser.add_argument("--check", action="store_true", help="only report files that are out of date")
    generate_parser.set_defaults(handler=generate)

    push_parser = sub.add_parser(
        "push",
        help="upload the dashboards to Grafana through its HTTP API",
        description="Create the folder if missing and upload both dashboards into it, overwriting earlier "
        "versions (their uids, and so their links, stay). Exits 1 with what to check if Grafana refuses the "
        "token or cannot be reached.",
    )
    push_parser.add_argument("--url", required=True, help="Grafana's root URL, with any sub-path")
    push_parser.add_argument("--token", help=f"service account token (default: ${TOKEN_ENV})")
    push_parser.add_argument("--folder", default="gradwatch", help="folder title (default gradwatch)")
    push_parser.add_argument("--dir", metavar="DIR", help="push the JSON files in DIR instead of generating them")
    push_parser.set_defaults(handler=push)


def generate(args: argparse.Namespace) -> int:
    """Rewrite the dashboard JSON in ``--out``; with ``--check``, only report stale files (exit 1)."""
    try:
        from gradwatch.watchdog.dashboards.render import stale_files, write_all
    except ImportError as exc:
        print(MISSING_EXTRA.format(exc), file=sys.stderr)
        return EXIT_FAILURE

    out = Path(args.out)
    if args.check:
        stale = stale_files(out)
        for name in stale:
            print(f"{out / name}: differs from the generator (run `gradwatch dashboards generate --out {out}`)")
        return EXIT_FAILURE if stale else 0
    for path in write_all(out):
        print(f"wrote {path}")
    return 0


def push(args: argparse.Namespace) -> int:
    """Upload the dashboards (generated, or read from ``--dir``) to the Grafana at ``--url``."""
    import json

    try:
        from gradwatch.watchdog.dashboards.push import PushError, load_dashboards, push_dashboards
    except ImportError as exc:
        print(MISSING_EXTRA.format(exc), file=sys.stderr)
        return EXIT_FAILURE

    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        print(f"gradwatch dashboards push: give --token or set {TOKEN_ENV} (a Grafana service account token)",
              file=sys.stderr)
        return EXIT_FAILURE
    try:
        if args.dir:
            boards = load_dashboards(args.dir)
        else:
            from gradwatch.watchdog.dashboards.render import render_all  # needs grafana-foundation-sdk too

            boards = [json.loads(text) for text in render_all().values()]
        pushed = push_dashboards(args.url, token, boards, folder=args.folder)
    except PushError as exc:
        print(f"gradwatch dashboards push: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    for board in pushed:
        print(f"{board.title}: {board.url} (version {board.version})")
    return 0
