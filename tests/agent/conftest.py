import pytest

import gradwatch.agent
from tests.agent.fake_watchdog import FakeWatchdog


@pytest.fixture
def attach():
    """watch() on an ephemeral port; every agent is closed at the end of the test."""
    agents = []

    def _attach(model, optimizer, **settings):
        settings.setdefault("port", 0)
        settings.setdefault("run", "test")
        agent = gradwatch.agent.watch(model, optimizer, **settings)
        agents.append(agent)
        return agent

    yield _attach
    for agent in agents:
        agent.close()


def sample(agent, name: str, **labels) -> float | None:
    """A value read back through the agent's own Prometheus registry."""
    return agent.registry.get_sample_value(name, {"run": agent.config.run, "rank": "0", **labels})


SECRET = b"test-secret"


@pytest.fixture
def watchdog(monkeypatch):
    """A fake watchdog holding the shared command secret, which the agents read from GRADWATCH_SECRET."""
    monkeypatch.setenv("GRADWATCH_SECRET", SECRET.decode())
    wd = FakeWatchdog(SECRET)
    yield wd
    wd.close()
