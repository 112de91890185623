#!/usr/bin/env bash
# The main command: sets everything up on a fresh machine and runs the demo.
#   bash scripts/demo.sh [demo options]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
exec "$VENV/bin/python" examples/quickstart.py "$@"
