"""``gradwatch command RUN ACTION``: an operator's command to a running trainer, signed with the shared secret.

    gradwatch command my-run lower-lr --factor 0.5
    gradwatch command my-run enable-clipping --mode global_norm --threshold auto
    gradwatch command my-run restore-lr
    gradwatch pin my-run            # keep the watchdog from undoing the run's remediation
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
    cmd.add_argument("--factor", type=float, help="lower-lr: multiply the LR scale by this (0.01 <= f < 1; default 0.5); "
                     "restore-lr: raise it by this (1 < f <= 10, never above 1; default straight to 1)")
    cmd.add_argument("--min-lr", type=float, help="lower-lr: never below this learning rate")
    cmd.add_argument("--mode", help="enable-clipping: global_norm, clip_l2_per_layer, clip_l2_per_param_type, "
                     "clip_value, renorm_l2_per_layer, renorm_l2_per_param_type or adaptive")
    cmd.add_argument("--threshold", help="enable-clipping: a number in (0, 1e6] or 'auto' (default auto)")
    cmd.add_argument("--z", type=float, help="enable-clipping --mode adaptive: z-score threshold in (0, 100] (default 2.5)")
    cmd.add_argument("--before-step", type=int, help="rollback: restore the newest snapshot taken before this step")
    cmd.add_argument("--skip-batches", type=int, help="rollback: batches the trainer skips after the restore")
    cmd.add_argument("--lr-scale", type=float, help="rollback: multiply the LR scale by this on resume (0 < s <= 1)")
    cmd.add_argument("--reason", default="operator", help="recorded in the audit log")
    cmd.add_argument("--url", default=None, help=f"watchdog URL (default $GRADWATCH_URL or {DEFAULT_URL})")
    cmd.add_argument("--secret-file", help="file with the shared secret (default $GRADWATCH_SECRET)")
    cmd.set_defaults(handler=run_command)

    pin = commands.add_parser(
        "pin",
        help="keep a run's automatic remediation in force (never restored), or release it",
        description="The watchdog undoes its automatic remediation (LR cuts, clipping) once a run is healthy "
        "again. `gradwatch pin RUN` keeps it as it is; `--release` lets the watchdog restore it again.",
    )
    pin.add_argument("run")
    pin.add_argument("--release", action="store_true", help="release the pin")
    pin.add_argument("--reason", default="operator", help="recorded in the audit log")
    pin.add_argument("--url", default=None, help=f"watchdog URL (default $GRADWATCH_URL or {DEFAULT_URL})")
    pin.add_argument("--secret-file", help="file with the shared secret (default $GRADWATCH_SECRET)")
    pin.set_defaults(handler=run_pin)


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
    except ValidationError as exc:
        for err in exc.errors():
            field = str(err["loc"][-1]) if err["loc"] else args.action
            print(f"gradwatch command: invalid {args.action}: {field}: {err['msg']}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"gradwatch command: invalid {args.action}: {exc}", file=sys.stderr)
        return 2
    body = {"spec": spec.model_dump(mode="json"), "reason": args.reason}
    record = _send(args, "command", "POST", f"/api/v1/runs/{args.run}/commands", body)
    if isinstance(record, int):
        return record
    base = _base(args)
    print(f"issued {record['action']} to {record['run']} (command {record['id']}, seq {record['seq']}); "
          f"see {base}/api/v1/commands?run={record['run']} for its acknowledgement")
    return 0


def run_pin(args: argparse.Namespace) -> int:
    method = "DELETE" if args.release else "POST"
    answer = _send(args, "pin", method, f"/api/v1/runs/{args.run}/pin", {"reason": args.reason})
    if isinstance(answer, int):
        return answer
    print(f"{args.run}: remediation {'released: the watchdog may restore it' if args.release else 'pinned: the watchdog will not restore it'}")
    return 0


def _base(args: argparse.Namespace) -> str:
    return (args.url or os.environ.get("GRADWATCH_URL") or DEFAULT_URL).rstrip("/")


def _send(args: argparse.Namespace, name: str, method: str, path: str, payload: dict) -> dict | int:
    """One signed request to the watchdog: its JSON answer, or the exit code after saying what went wrong."""
    secret = read_secret(args.secret_file)
    if secret is None:
        print(f"gradwatch {name}: no secret (set GRADWATCH_SECRET or pass --secret-file)", file=sys.stderr)
        return 2
    base = _base(args)
    body = json.dumps(payload).encode()
    request = urllib.request.Request(base + path, data=body, method=method)
    request.add_header("Content-Type", "application/json")
    request.add_header(AUTH_HEADER, sign_request(secret, method, urlsplit(base).path + path, body, time.time()))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        print(f"gradwatch {name}: the watchdog refused (HTTP {exc.code}): {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"gradwatch {name}: cannot reach the watchdog at {base}: {exc}", file=sys.stderr)
        return 1
