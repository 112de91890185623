"""``gradwatch demo``'s command line. Only argparse here: the demo itself (torch,
matplotlib) is imported when the command runs, so ``gradwatch --help`` stays fast."""

from __future__ import annotations

import argparse
import sys

SCENARIOS = ("exploding_rnn", "nan_batch", "vanishing", "lr_too_high")


def add_parser(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="watch a real training run go wrong and gradwatch fix it",
        description="Train a small model that goes wrong (default: a recurrent network whose gradients "
        "explode) with the agent attached and the watchdog service running on loopback, tell what happens "
        "as it happens, train the same seed without gradwatch, and draw both. Needs torch and matplotlib "
        "(pip install 'gradwatch[demo]').",
    )
    demo.add_argument("--scenario", choices=SCENARIOS, default="exploding_rnn",
                      help="exploding_rnn (default), nan_batch (a corrupted record), vanishing (a deep sigmoid "
                      "network), lr_too_high (a transformer whose warm-up goes too high)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the model, data and batches (default 0)")
    demo.add_argument("--out", default=None, metavar="DIR",
                      help="directory for the picture, timeline, traces and the services' files "
                      "(default ./gradwatch-demo/SCENARIO)")
    demo.add_argument("--no-baseline", action="store_true", help="skip the run without gradwatch")
    demo.add_argument("--keep-running", action="store_true",
                      help="after training, keep the agent's /metrics and the watchdog's API up until Ctrl-C")
    demo.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        from gradwatch.demo.run import main
    except ImportError as exc:
        print(f"gradwatch demo: {exc.name or exc} is not installed; pip install 'gradwatch[demo]'", file=sys.stderr)
        return 2
    if args.out is None:
        args.out = f"gradwatch-demo/{args.scenario}"
    return main(args)
