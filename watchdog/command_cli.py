"""``gradwatch command RUN ACTION``: an operator's command to a running trainer, signed with the shared secret.

    gradwatch command my-run lower-lr --factor 0.5
    gradwatch command my-run enable-clipping --mode global_norm --threshold auto
    gradwatch command my-run restore-lr
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from pydantic import TypeAdapter, ValidationError

from gradwatch.watchdog.schema import ACTIONS, AUTH_HEADER, Action, read_secret, sign_request

DEFAULT_URL = "http://127.0.0.1:9400"


def add_parser(commands) -> None:
    cmd = commands.add_parser(
        "command",
        help="send a remediation command to a running trainer",
        description="Issue a command to RUN through the watchdog (GRADWATCH_URL, default "
        f"{DEFAULT_URL}), signed with GRADWATCH_SECRET (or --secret-file). The agent applies it "
        "between two steps, within its own bounds, and acknowledges it with the step.",
    )
    cmd.add_argument("run")
    cmd.add_argument("action", choices=[a.replace("_", "-") for a in ACTIONS])
    cmd.add_argument("--factor", type=float, help="lower-lr: multiply the LR scale by this (0 < f < 1; default 0.5)")
    cmd.add_argument("--min-lr", type=float, help="lower-lr: never below this learning rate")
    cmd.add_argument("--mode", help="enable-clipping: global_norm, clip_l2_per_layer, clip_l2_per_param_type, "
                     "clip_value, renorm_l2_per_layer, renorm_l2_per_param_type or adaptive")
    cmd.add_argument("--threshold", help="enable-clipping: a positive number or 'auto' (default auto)")
    cmd.add_argument("--z", type=float, help="enable-clipping --mode adaptive: z-score threshold (default 2.5)")
    cmd.add_argument("--before-step", type=int, help="rollback: restore the newest snapshot taken before this step")
    cmd.add_argument("--skip-batches", type=int, help="rollback: batches the trainer skips after the restore")
    cmd.add_argument("--lr-scale", type=float, help="rollback: multiply the LR scale by this on resume (0 < s <= 1)")
    cmd.add_argument("--reason", default="operator", help="recorded in the audit log")
    cmd.add_argument("--url", default=None, help=f"watchdog URL (default $GRADWATCH_URL or {DEFAULT_URL})")
    cmd.add_argument("--secret-file", help="file with the shared secret (default $GRADWATCH_SECRET)")
    cmd.set_defaults(handler=run_command)


def build_spec(args: argparse.Namespace) -> Action:
    fields = {"action": args.action.replace("-", "_")}
    for name in ("factor", "min_lr", "mode", "threshold", "z", "before_step", "skip_batches", "lr_scale"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if fields.get("threshold") not in (None, "auto"):
        fields["threshold"] = float(fields["threshold"])
    return TypeAdapter(Action).validate_python(fields)


def run_command(args: argparse.Namespace) -> int:
    try:
        spec = build_spec(args)
    except (ValidationError, ValueError) as exc:
        print(f"gradwatch command: invalid {args.action}: {exc}", file=sys.stderr)
        return 2
    secret = read_secret(args.secret_file)
    if secret is None:
        print("gradwatch command: no secret (set GRADWATCH_SECRET or pass --secret-file)", file=sys.stderr)
        return 2
    base = (args.url or os.environ.get("GRADWATCH_URL") or DEFAULT_URL).rstrip("/")
    path = f"/api/v1/runs/{args.run}/commands"
    body = json.dumps({"spec": spec.model_dump(mode="json"), "reason": args.reason}).encode()
    request = urllib.request.Request(base + path, data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    request.add_header(AUTH_HEADER, sign_request(secret, "POST", urlsplit(base).path + path, body, time.time()))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            record = json.load(response)
    except urllib.error.HTTPError as exc:
        print(f"gradwatch command: the watchdog refused (HTTP {exc.code}): {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"gradwatch command: cannot reach the watchdog at {base}: {exc}", file=sys.stderr)
        return 1
    print(f"issued {record['action']} to {record['run']} (command {record['id']}, seq {record['seq']}); "
          f"see {base}/api/v1/commands?run={record['run']} for its acknowledgement")
    return 0
