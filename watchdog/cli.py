"""The ``gradwatch`` command line. Each subcommand imports what it needs when it runs,
so ``gradwatch --help`` and ``gradwatch rules check`` stay fast and the service never
imports torch.

    gradwatch serve [--config FILE] [--host H] [--port N] [--db PATH] [--prometheus-url URL] [--scrape-interval S] [--remediation observe]
    gradwatch rules check FILE...
    gradwatch rules export [--format prometheus] [FILE] [-o OUT] [--group NAME] [--interval 2s]
    gradwatch command RUN ACTION [--factor F] [--min-lr LR] [--mode M] [--threshold T|auto] [--z Z]
    gradwatch incident list|show ID [-o PNG]
    gradwatch dashboards generate|push ...
    gradwatch demo [--scenario NAME] [--seed N] [--out DIR] [--no-baseline] [--keep-running]

Exit codes: 0 fine; 1 ``rules check`` found problems, or the port could not be bound;
2 ``serve`` refused to start (bad setting, bad config file, unusable store).
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version

EXIT_FAILURE = 1  # `rules check` found problems; `serve` could not bind its port
EXIT_REFUSED = 2  # `serve` refused to start: a bad setting, config file or store


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradwatch", description="Watch the gradients of PyTorch trainings.")
    parser.add_argument("--version", action="version", version=f"gradwatch {version('gradwatch')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the watchdog service",
        description="Run the watchdog: scrape registered agents (or query Prometheus), evaluate the rules, "
        "notify, and serve the HTTP API. Every option can also come from a GRADWATCH_* environment "
        "variable (e.g. GRADWATCH_PORT); options win. SIGHUP reloads the config file.",
    )
    serve.add_argument(
        "--config", metavar="FILE", help="YAML config with rules and notifiers (default: built-in rule pack, no notifiers)"
    )
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 9400; 0: any free port)")
    serve.add_argument("--db", metavar="PATH", help="SQLite state file (default ./gradwatch.db)")
    serve.add_argument("--prometheus-url", metavar="URL", help="query this Prometheus instead of scraping agents directly")
    serve.add_argument("--scrape-interval", metavar="SECONDS", help="seconds between rounds, e.g. 2 or 500ms (default 2)")
    serve.add_argument(
        "--remediation", choices=["enforce", "observe"],
        help="observe: decide, audit and notify what would be applied, send nothing (default enforce)",
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"], help="default info")
    serve.set_defaults(handler=_serve)

    rules = commands.add_parser("rules", help="work with rule files")
    rules_commands = rules.add_subparsers(dest="rules_command", metavar="COMMAND", required=True)
    check = rules_commands.add_parser(
        "check",
        help="validate rules or config files",
        description="Validate each file as `serve --config` would (rules, and notifiers if any). Prints "
        "FILE: ok (N rules), or FILE:LINE: location: reason for each problem; exits 1 on any problem.",
    )
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(handler=_rules_check)
    export = rules_commands.add_parser(
        "export",
        help="write the rules as a Prometheus rule file",
        description="Write the rules of FILE (a rules or config file; default: the built-in pack) as a Prometheus "
        "rule file in PromQL, for rule_files or a PrometheusRule's spec. Rules, or parts of rules, that are not "
        "exported are named on stderr. Exits 1 if FILE has problems (printed as `rules check` prints them).",
    )
    export.add_argument("file", nargs="?", metavar="FILE", help="rules or config file (default: the built-in rule pack)")
    export.add_argument("--format", choices=["prometheus"], default="prometheus", help="output format (default prometheus)")
    export.add_argument("-o", "--output", metavar="OUT", help="write the rule file here instead of stdout")
    export.add_argument("--group", default="gradwatch", help="rule group name (default gradwatch)")
    export.add_argument("--interval", default="2s", help="group evaluation interval, e.g. 2s (default 2s)")
    export.set_defaults(handler=_rules_export)

    from gradwatch.watchdog import command_cli

    command_cli.add_parser(commands)

    from gradwatch.watchdog import incident_cli

    incident_cli.add_parser(commands)

    from gradwatch.watchdog.dashboards import commands as dashboards_commands

    dashboards_commands.add_parser(commands)

    from gradwatch.demo import cli as demo_cli

    demo_cli.add_parser(commands)
    return parser


def format_problem(source: str, problem) -> str:
    """``FILE:LINE: location: reason`` (compilers' format, so editors can jump to it)."""
    where = f"{source}:{problem.line}" if problem.line else source
    return f"{where}: {problem.location}: {problem.reason}"


def _rules_check(args: argparse.Namespace) -> int:
    from gradwatch.watchdog.config_file import ConfigError, load_config

    status = 0
    for path in args.files:
        try:
            config = load_config(path)
        except ConfigError as exc:
            status = EXIT_FAILURE
            for problem in exc.problems:
                print(format_problem(path, problem))
            continue
        n = len(config.notifiers)
        notifiers = f", {n} notifier{'' if n == 1 else 's'}" if n else ""
        print(f"{path}: ok ({len(config.rules)} rules{notifiers})")
    return status


def _rules_export(args: argparse.Namespace) -> int:
    from gradwatch.watchdog.rules.export_cli import export_command

    return export_command(args)


def _serve(args: argparse.Namespace) -> int:
    from gradwatch.watchdog.serve import serve

    overrides = {
        "config": args.config,
        "host": args.host,
        "port": args.port,
        "db": args.db,
        "prometheus_url": args.prometheus_url,
        "scrape_interval": args.scrape_interval,
        "log_level": args.log_level,
        "remediation": args.remediation,
    }
    return serve({k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
