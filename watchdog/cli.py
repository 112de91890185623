"""The ``gradwatch`` command line. Each subcommand imports what it needs when it runs,
so ``gradwatch rules check`` stays fast and the service never imports torch."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradwatch", description="Watch the gradients of PyTorch trainings.")
    parser.add_argument("--version", action="version", version=f"gradwatch {version('gradwatch')}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
