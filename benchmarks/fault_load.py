"""Fault-and-load benchmark: reruns the hardening pass's attacks and faults, prints one table.

    python benchmarks/fault_load.py           # every scenario, full size
    python benchmarks/fault_load.py --quick   # a fast smoke run (small counts, rough numbers)
    python benchmarks/fault_load.py --only store,targets

Scenarios live in ``benchmarks/faults/`` (``scrape_flood``, ``targets``, ``store``): each
module's ``run(quick)`` returns rows of (scenario, measure, value, goal, met). A module
that is missing is skipped and named; one that fails is shown as a failed row, and the
others still run. Everything runs on loopback; exit code 1 when a goal is not met.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` and `faults`, from any working directory

from common import format_table, header_lines, mark  # noqa: E402

MODULES = ("scrape_flood", "targets", "store")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts: checks the scenarios run, rough numbers")
    parser.add_argument("--only", default=",".join(MODULES), help=f"comma-separated modules (default: {','.join(MODULES)})")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    print("\n".join(header_lines({"mode": "quick" if args.quick else "full"})))
    rows, skipped = [], []
    for name in names:
        try:
            module = importlib.import_module(f"faults.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"faults.{name}":
                skipped.append(name)
                continue
            module = exc
        try:
            if isinstance(module, Exception):
                raise module
            rows += module.run(args.quick)
        except Exception as exc:  # one broken scenario must not hide the others' figures
            traceback.print_exc()
            rows.append({"scenario": name, "measure": "ran", "value": f"failed: {exc}", "goal": "runs", "met": False})
    print()
    print(format_table(
        ["scenario", "measure", "value", "goal", "met"],
        [[r["scenario"], r["measure"], r["value"], r["goal"], mark(r["met"])] for r in rows],
        align="<<><<",
    ))
    if skipped:
        print(f"\nnot present, skipped: {', '.join(skipped)}")
    return 1 if any(r["met"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
