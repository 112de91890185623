#!/usr/bin/env bash
# The main command: sets everything up on a fresh machine and runs the demo.
#   bash scripts/demo.sh [gradwatch demo options, e.g. --scenario nan_batch --keep-running]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
exec "$VENV/bin/gradwatch" demo "$@"
