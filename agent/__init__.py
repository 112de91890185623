"""gradwatch.agent — runs inside the trainer: per-layer gradient telemetry, the step guard, /metrics.

    agent = gradwatch.agent.watch(model, optimizer, run="my-run")
"""

from gradwatch.agent.agent import Agent, watch
from gradwatch.agent.config import AgentConfig

__all__ = ["Agent", "AgentConfig", "watch"]
