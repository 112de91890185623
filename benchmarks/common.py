"""Helpers shared by the benchmarks: the header that makes a result reproducible, verdict marks, plain tables.

Standard library only: the watchdog's benchmarks import this too, and the watchdog
never imports torch.
"""

from __future__ import annotations

import platform
import shlex
import sys
from collections.abc import Sequence


def command_line() -> str:
    """The command that started this process, ready to paste."""
    return shlex.join(["python", *sys.argv])


def header_lines(extra: dict[str, str]) -> list[str]:
    """What every benchmark prints first, so a result can be reproduced and compared."""
    lines = [f"command:  {command_line()}", f"python:   {platform.python_version()} ({platform.machine()})"]
    lines += [f"{key + ':':<9} {value}" for key, value in extra.items()]
    return lines


def mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("✓" if ok else "✗")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A plain-text table; ``align`` holds one of ``<``/``>`` per column (default: first left, rest right)."""
    align = align or "<" + ">" * (len(headers) - 1)
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(f"{str(c):{a}{w}}" for c, a, w in zip(cells, align, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(headers), rule, *(fmt(r) for r in rows)])
