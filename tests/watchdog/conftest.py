"""Fixtures for the watchdog's tests."""

import os

import pytest

from tests.watchdog.fakes import FakeAgent


@pytest.fixture(autouse=True)
def _no_gradwatch_environment(monkeypatch):
    # Settings read GRADWATCH_* variables: a developer's own must not change what a test runs.
    for name in [n for n in os.environ if n.startswith("GRADWATCH_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def fake_agent():
    """An agent-like /metrics endpoint (run r1, rank 0), stopped after the test."""
    agent = FakeAgent()
    yield agent
    agent.stop()
