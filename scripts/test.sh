#!/usr/bin/env bash
# The test command: installs what the tests need on a fresh machine, then runs them.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

# Real Prometheus and Alertmanager (Debian packages) for the integration tests.
if ! command -v prometheus >/dev/null || ! command -v prometheus-alertmanager >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing prometheus, prometheus-alertmanager (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager >/dev/null
  else
    echo "warning: prometheus/prometheus-alertmanager not installed and not root: integration tests will skip" >&2
  fi
fi

source scripts/venv.sh
echo "== running tests"
exec "$VENV/bin/python" -m pytest "$@"
