# The gradwatch watchdog service, slim: gradwatch[watchdog] only — no torch.
#   docker build -f deploy/watchdog.Dockerfile -t gradwatch-watchdog:0.1.0 .   (from the repository root)
#   docker run -p 127.0.0.1:9400:9400 -e GRADWATCH_SECRET=... gradwatch-watchdog:0.1.0
# Every setting comes from GRADWATCH_* variables (see `gradwatch serve --help`).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY watchdog ./watchdog
# A wheel of gradwatch itself, and of its watchdog dependencies; torch is only in the
# `agent` extra and never installed here.
RUN pip wheel --wheel-dir /wheels ".[watchdog]"

FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links /wheels "gradwatch[watchdog]" && rm -rf /wheels \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"

RUN useradd --system --uid 10001 --home-dir /var/lib/gradwatch --create-home gradwatch
WORKDIR /var/lib/gradwatch
USER 10001

# In a container the API must listen beyond loopback; the state file lives in the
# working directory (mount a volume there to keep alert state across restarts).
ENV GRADWATCH_HOST=0.0.0.0 \
    GRADWATCH_PORT=9400 \
    GRADWATCH_DB=/var/lib/gradwatch/gradwatch.db
EXPOSE 9400
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9400/healthz', timeout=4)"]

ENTRYPOINT ["gradwatch"]
CMD ["serve"]
