"""``gradwatch rules export --format prometheus [FILE] [-o OUT]``: the active rules as a Prometheus rule file.

FILE is a rules file or the watchdog's config file (its ``rules:``; none: the default
pack, as ``serve`` would use); without FILE, the built-in default pack. The YAML goes
to stdout or OUT; every rule or part of a rule that is not exported is named on
stderr. A file that does not load is reported like ``gradwatch rules check`` does
and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gradwatch.watchdog.config_file import ConfigError, WatchdogConfig
from gradwatch.watchdog.rules.loader import Problem, load_rules, parse_document, read_file
from gradwatch.watchdog.rules.models import RULE_MODELS, RulesFile
from gradwatch.watchdog.rules.promql import export_rules

EXIT_OK = 0
EXIT_PROBLEMS = 1
FORMATS = ("prometheus",)


class _RulesOfConfig(WatchdogConfig):
    """A config file read for its rules only: notifiers are not exported, so their
    checks (a ``url_env`` set in the environment) must not stop an export in CI."""

    notifiers: Any = None


def export_command(args: argparse.Namespace) -> int:
    """Handler for ``rules export``: ``args.file`` (or None), ``args.output`` (or None), ``args.format``,
    and optionally ``args.group`` and ``args.interval``."""
    if args.format not in FORMATS:  # argparse's choices refuse it first; kept for direct callers
        print(f"gradwatch: unknown export format {args.format!r} (known: {', '.join(FORMATS)})", file=sys.stderr)
        return EXIT_PROBLEMS
    try:
        rules = _load(args.file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(_format_problem(args.file, problem))
        return EXIT_PROBLEMS
    try:
        text, unsupported = export_rules(
            rules, group=getattr(args, "group", None) or "gradwatch", interval=getattr(args, "interval", None) or "2s"
        )
    except ValueError as exc:  # a bad --interval
        print(f"gradwatch: --interval: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            print(f"gradwatch: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_PROBLEMS
    else:
        sys.stdout.write(text)
    for item in unsupported:
        print(f"gradwatch: rule {item.rule}: {item.reason}", file=sys.stderr)
    return EXIT_OK


def _load(path: str | None) -> RulesFile:
    if path is None:
        return load_rules(None)
    source, text = read_file(path, ConfigError)
    return parse_document(text, _RulesOfConfig, source, tagged=RULE_MODELS, error=ConfigError)


def _format_problem(source: str, problem: Problem) -> str:
    # imported here: cli.py imports this module's handler lazily, never the other way round at import time
    from gradwatch.watchdog.cli import format_problem

    return format_problem(source, problem)
