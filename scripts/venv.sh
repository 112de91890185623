# Sourced by the README's commands: a project virtualenv with the pinned CPU torch and gradwatch[dev].
VENV="${GRADWATCH_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, gradwatch.agent, gradwatch.watchdog, fastapi, grafana_client" 2>/dev/null \
   || [ pyproject.toml -nt "$VENV/.gradwatch-installed" ]; then
  echo "== installing torch==2.13.0 and gradwatch[dev] into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
  "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[dev]'
  touch "$VENV/.gradwatch-installed"
fi
export PATH="$PWD/$VENV/bin:$PATH"
